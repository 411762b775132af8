"""Prompt rendering shared by every backend, so teacher and student see the same text.

The default letter prompt is lm-evaluation-harness's MMLU prompt: an optional description line, the
question, "A. option" lines, then "Answer:" with no trailing space (the answer token is " A").
"""

from __future__ import annotations

from collections.abc import Sequence

from kdflow.config import ScoringConfig
from kdflow.records import LETTERS


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def _description(category: str, cfg: ScoringConfig) -> str:
    if not cfg.description or not category:
        return ""
    return cfg.description.format(category=category.replace("_", " "))


def letter_prompt(question: str, options: Sequence[str], category: str, cfg: ScoringConfig) -> str:
    """The prompt whose next token is the option letter."""
    return cfg.letter_template.format(
        description=_description(category, cfg), question=question.strip(), options=format_options(options)
    ).rstrip(" ")


def cloze_context(question: str, category: str, cfg: ScoringConfig) -> str:
    """The text every option continues; it never ends with a space (the space starts the option)."""
    return cfg.cloze_template.format(question=question.strip(), category=category).rstrip(" ")


def cloze_continuation(option: str) -> str:
    return " " + option.strip()
