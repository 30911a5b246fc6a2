"""VLMEvalKit-style MCQ prompt text, in the item's language.

As the official Parrot VLMEvalKit adapter's ``build_multi_choice_prompt``: ``[hint\n]question\nA. ...\nB. ...
\n<instruction>``, where the instruction ("Answer with the option's letter from the given choices directly.") is
written in the item's language, or in Chinese wherever the prompt holds a Chinese character
(:func:`mmmb.languages.answer_instruction`). Chat formatting and the ``<image>`` placeholder are the model
adapter's job.
"""
from __future__ import annotations

from typing import Sequence

from mmmb.languages import answer_instruction
from mmmb.tsv import OPTION_LETTERS, MCQRecord


def mcq_prompt_text(question: str, labelled_options: Sequence[tuple[str, str]], language: str,
                    hint: str | None = None) -> str:
    """``[hint\n]question\nA. ...\n<instruction>`` from (letter, text) pairs (`answer_instruction`)."""
    lines = [hint] if hint else []
    lines.append(question)
    lines.extend(f"{letter}. {text}" for letter, text in labelled_options)
    body = "\n".join(lines)
    return body + "\n" + answer_instruction(language, body)


def format_question(record: MCQRecord, options: Sequence[str], language: str) -> str:
    """Prompt text for ``record`` with ``options`` (possibly rotated) labelled A, B, ... in order."""
    return mcq_prompt_text(record.question, list(zip(OPTION_LETTERS, options)), language, record.hint)


def rotate_options(record: MCQRecord, rotation: int) -> tuple[tuple[str, ...], str]:
    """Options shifted left by ``rotation`` (circular evaluation) and the answer letter after the shift."""
    n = len(record.options)
    options = record.options[rotation:] + record.options[:rotation]
    return options, OPTION_LETTERS[(record.answer_position - rotation) % n]


def prompt_fields(record: MCQRecord) -> list[tuple[str, str]]:
    """(TSV column, text) of every part of ``record`` that goes into its prompt: hint, question, options."""
    fields = [("hint", record.hint)] if record.hint else []
    fields.append(("question", record.question))
    fields.extend(zip(OPTION_LETTERS, record.options))
    return fields


def reserved_text_in(text: str, reserved: Sequence[str]) -> str | None:
    """The first of ``reserved`` (control-token texts, see ``MCQModel.reserved_texts``) that occurs in ``text``,
    or None. The longest of those starting there, so "<|im_end|>" is named rather than a shorter text inside it."""
    hits = [(text.find(token), -len(token), token) for token in reserved if token and token in text]
    return min(hits)[2] if hits else None


def reserved_text_message(found: str) -> str:
    """Why an item spelling ``found`` is refused, and what to do."""
    return (f"the text contains {found!r}, which the model's tokenizer reads as a control token (a chat-turn "
            "marker, end of text or the image placeholder) rather than as text; training skips such records, so "
            "evaluation refuses the item: reword it (in every language)")
