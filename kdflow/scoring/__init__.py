"""option_logits: the one way a model's opinion about the options of a question is read out.

Teacher labeling, student training (gradients flow through it) and evaluation all call
`encode` (or `tokenize` + `collate`) and then `option_logits`, so their numbers are comparable. Prompts come
from kdflow.prompts, the renderer every backend shares.

- letter: one prompt per question listing "A. ..." lines; option i scores the log-probability (softmax over
  the whole vocabulary) of its letter at the answer position. The letter's token is the one the tokenizer
  produces for it right after the rendered prompt: prompt + letter (" A" after "Answer:", "A" starting a
  chat answer) is encoded in one piece and the single token after the prompt's tokens is taken. Scoring a
  form the model would never write ("A" glued to "Answer:") adds that form's prior, so only the natural form
  is scored unless `letter_forms: sum`.
- cloze: option i scores the summed log-probability of its text tokens after the question context. Context
  and option are encoded together and split at the context's token count, as lm-evaluation-harness does
  (its `_encode_pair`): whitespace ending the context moves to the front of the option, whole =
  encode(context + option), option tokens = whole[len(encode(context)):]. Encoding " option" on its own
  would, with tokenizers that prepend "▁" (Llama-2, Mistral-v0.1), score a stray "▁" token that never
  occurs in running text. `length_normalise` adds a second prediction rule (summed log-probability per
  character, lm-evaluation-harness acc_norm) in `OptionScores.normalised`; the scores, and so the soft
  labels and the training signal, stay the summed log-likelihoods (a distribution over the options).

Every question is one row, before merging. A cloze row is the context followed by all the option texts,
packed one after another, so the context is computed once per question instead of once per option. A 4D
attention mask (built from `ScoringBatch.segments` on the model's device) keeps the options apart: context
tokens attend causally to the context, option i's tokens to the whole context and causally to option i's
own tokens, never to another option; option i's position ids restart where the context ends. Each option
therefore scores what a plain causal pass over context + option i gives. Its first token is predicted at
the last context position, which all options share.

Work is not repeated (`collate`): questions with the same letter prompt share one row, and questions with
the same cloze context share one row holding each distinct option once (demo and exam sets repeat question
texts), capped at the longest question's row length; scores are fanned back out to every question. All
rows of a batch begin with the tokens they share (BOS, a chat frame or system prompt, an instruction line),
then their padding, then the rest, with explicit position ids; without gradients that prefix is computed
once and its keys and values reused by every row. Padding is masked and position ids skip it, so a row
scores exactly as it would alone.

Truncation: a row longer than `max_length` keeps the BOS token, the chat frame, the option lines (letter)
or the option texts (cloze) and the answer cue; the question text loses its middle (its start usually
states the task, its end asks the question a passage leads to), replaced by " ... ". The row is re-rendered
and re-encoded until it fits; `EncodedQuestion.truncated` marks it. If even an empty question text cannot
fit, ScoringError names the question and max_length.

Every row ends in the last column, so the answer position (letter) and the packed options (cloze) are the
final columns: the output head runs only there (`logits_to_keep`), and for cloze only at the positions that
predict an option token, never over a [rows, length, vocab] tensor.
"""

from kdflow.scoring.batch import Placement, ScoringBatch, collate, encode, merge_rows
from kdflow.scoring.encoding import (
    ELISION,
    EncodedQuestion,
    EncodingMemo,
    Mode,
    ScoringError,
    split_pair,
    tokenize,
    trim_middle,
)
from kdflow.scoring.forward import OptionScores, option_logits, to_soft_labels

__all__ = [
    "ELISION",
    "EncodedQuestion",
    "EncodingMemo",
    "Mode",
    "OptionScores",
    "Placement",
    "ScoringBatch",
    "ScoringError",
    "collate",
    "encode",
    "merge_rows",
    "option_logits",
    "split_pair",
    "to_soft_labels",
    "tokenize",
    "trim_middle",
]
