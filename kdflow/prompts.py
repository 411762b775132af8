"""The one prompt renderer: every backend (hf, vllm, openai), training and evaluation get their text here.

The default letter prompt is lm-evaluation-harness's MMLU prompt: an optional description line, the
question, "A. option" lines, then "Answer:" with no trailing space (the answer token is " A").

Decisions made here and nowhere else:
- chat template (letter mode only; cloze always scores plain text): `scoring.chat_template` on = always,
  off = never, auto = when the tokenizer (or server) has one. A chat prompt is the optional system message
  (`scoring.system_prompt`) plus the letter prompt as the user turn, rendered with the generation prompt
  and `enable_thinking=False`: scoring reads the first answer token, which must be the letter, never a
  "<think>" block.
- the letter cue: the answer letter follows the prompt directly; after a chat generation prompt it starts
  the assistant turn with no space ("A"), after "Answer:" it is " A" (`letter_continuation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdflow.config import ScoringConfig
from kdflow.errors import KdflowError
from kdflow.records import LETTERS

# Passed to every chat-template rendering (and to servers as chat_template_kwargs): templates that know
# the flag (Qwen3) then open the answer directly, templates that do not ignore it.
CHAT_TEMPLATE_KWARGS: dict[str, Any] = {"enable_thinking": False}


class PromptError(KdflowError):
    """The prompt settings cannot be honoured for this tokenizer; the message names the setting."""


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def _description(category: str, cfg: ScoringConfig) -> str:
    if not cfg.description or not category:
        return ""
    return cfg.description.format(category=category.replace("_", " "))


def letter_prompt(question: str, options: Sequence[str], category: str, cfg: ScoringConfig) -> str:
    """The plain (non-chat) letter prompt, whose next token is the option letter."""
    return cfg.letter_template.format(
        description=_description(category, cfg), question=question.strip(), options=format_options(options)
    ).rstrip(" ")


def cloze_context(question: str, category: str, cfg: ScoringConfig) -> str:
    """The text every option continues; it never ends with a space (the space starts the option)."""
    return cfg.cloze_template.format(question=question.strip(), category=category).rstrip(" ")


def cloze_continuation(option: str) -> str:
    """An option's text as it follows the cloze context (lm-evaluation-harness: a leading space)."""
    return " " + option.strip()


def uses_chat_template(has_template: bool, cfg: ScoringConfig) -> bool:
    """Whether letter prompts go through the chat template, for a tokenizer/server that has one or not.

    Raises PromptError for chat_template 'on' without a template. Cloze never uses it.
    """
    if cfg.mode != "letter" or cfg.chat_template == "off":
        return False
    if cfg.chat_template == "on" and not has_template:
        raise PromptError(
            "scoring.chat_template is 'on' but this model's tokenizer has no chat template; use auto or off"
        )
    return has_template


def tokenizer_has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_messages(question: str, options: Sequence[str], category: str, cfg: ScoringConfig) -> list[dict[str, str]]:
    """The conversation of a chat letter prompt: [system (when scoring.system_prompt is set), user]."""
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*messages, {"role": "user", "content": letter_prompt(question, options, category, cfg)}]


@dataclass(frozen=True)
class ServerPrompt:
    """What a server-side backend sends for one question.

    messages: letter mode, the chat conversation (system + user) for /chat/completions, sent with
    CHAT_TEMPLATE_KWARGS; empty in cloze mode. prompt: the plain completion prompt (letter: the letter
    prompt; cloze: the context the option continuations follow, see `cloze_continuation`).
    """

    messages: list[dict[str, str]]
    prompt: str


def server_prompt(question: str, options: Sequence[str], category: str, cfg: ScoringConfig) -> ServerPrompt:
    """The chat `messages` and plain `prompt` for one question, rendered as the local backends render it."""
    if cfg.mode == "cloze":
        return ServerPrompt(messages=[], prompt=cloze_context(question, category, cfg))
    return ServerPrompt(
        messages=chat_messages(question, options, category, cfg),
        prompt=letter_prompt(question, options, category, cfg),
    )


@dataclass(frozen=True)
class Rendered:
    """A prompt as text, and whether the tokenizer should add its special tokens (BOS) to it: plain
    prompts get them, chat-templated ones do not (the template writes its own)."""

    text: str
    chat: bool

    @property
    def add_special_tokens(self) -> bool:
        return not self.chat


def render_letter(
    question: str, options: Sequence[str], category: str, tokenizer: Any, cfg: ScoringConfig
) -> Rendered:
    """The letter prompt as the model sees it: chat-templated (thinking off) or plain, per uses_chat_template."""
    if uses_chat_template(tokenizer_has_chat_template(tokenizer), cfg):
        text = tokenizer.apply_chat_template(
            chat_messages(question, options, category, cfg),
            tokenize=False,
            add_generation_prompt=True,
            **CHAT_TEMPLATE_KWARGS,
        )
        return Rendered(text=text, chat=True)
    return Rendered(text=letter_prompt(question, options, category, cfg), chat=False)


def letter_continuation(prompt: Rendered, letter: str) -> str:
    """The natural text of the answer letter right after `prompt`: "A" at the start of a chat answer or
    after whitespace, " A" after a cue such as "Answer:"."""
    if prompt.chat or prompt.text[-1:].isspace():
        return letter
    return " " + letter


def other_letter_form(natural: str) -> str:
    """The form `scoring.letter_forms: sum` adds to the natural one ("A" <-> " A")."""
    return natural[1:] if natural.startswith(" ") else " " + natural
