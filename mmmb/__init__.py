"""MMMB, the Massive Multilingual Multimodal Benchmark of Parrot (Sun et al., 2024): build, evaluate, rank.

Command lines: ``python -m mmmb.build``, ``python -m mmmb.evaluate``, ``python -m mmmb.leaderboard``.
"""
from mmmb.extract import extract_answer
from mmmb.languages import ANSWER_INSTRUCTION, LANGUAGES, canonical_language
from mmmb.tsv import MCQRecord, MMMBFormatError, check_alignment, read_mmmb, read_tsv, write_tsv

__all__ = [
    "ANSWER_INSTRUCTION", "LANGUAGES", "MCQRecord", "MMMBFormatError", "canonical_language", "check_alignment",
    "extract_answer", "read_mmmb", "read_tsv", "write_tsv",
]
