"""The six MMMB languages, their file-name codes and the answer instruction in each language.

MMMB (Parrot, Sun et al. 2024, Sec. 4) ships one VLMEvalKit MCQ TSV per language. The official files and
VLMEvalKit dataset names use ``cn`` for Chinese (``mmmb_cn.tsv``, ``MMMB_cn``); this package uses ``zh``
internally and accepts both spellings on input.
"""
from __future__ import annotations

import re

LANGUAGES: tuple[str, ...] = ("en", "zh", "pt", "ar", "tr", "ru")

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "zh": "Chinese", "pt": "Portuguese", "ar": "Arabic", "tr": "Turkish", "ru": "Russian",
}

# Spellings accepted in file names / CLI arguments → canonical code.
_ALIASES: dict[str, str] = {code: code for code in LANGUAGES} | {"cn": "zh"}

# VLMEvalKit's dataset suffix for each canonical code (``MMMB_cn`` is VLMEvalKit's name for Chinese).
VLMEVALKIT_CODE: dict[str, str] = {code: ("cn" if code == "zh" else code) for code in LANGUAGES}

# The MCQ answer instruction of each language, as the official Parrot VLMEvalKit adapter writes it
# (AIDC-AI/Parrot, VLMEvalKit/vlmeval/vlm/parrot.py, `build_multi_choice_prompt`; the English one is VLMEvalKit's).
ANSWER_INSTRUCTION: dict[str, str] = {
    "en": "Answer with the option's letter from the given choices directly.",
    "zh": "请直接用给定选项中的选项字母回答。",
    "pt": "Responda diretamente com a letra da opção das escolhas dadas.",
    "ar": "أجب مباشرةً بحرف الخيار من الاختيارات المعطاة.",
    "tr": "Verilen seçeneklerden doğrudan seçeneğin harfi ile cevap verin.",
    "ru": "Ответьте буквой варианта из предложенных вариантов напрямую.",
}

_CHINESE = re.compile(r"[\u4e00-\u9fa5]")  # VLMEvalKit's `cn_string`


def contains_chinese(text: str) -> bool:
    """Whether ``text`` holds a CJK unified ideograph (U+4E00..U+9FA5), VLMEvalKit's ``cn_string`` test."""
    return _CHINESE.search(text) is not None


def answer_instruction(language: str, prompt_text: str) -> str:
    """The instruction that ends an MCQ prompt whose hint / question / options are ``prompt_text``: the Chinese one
    for Chinese items and for any prompt with a Chinese character (the official adapter's rule: ``dataset[-3:] ==
    '_zh' or cn_string(prompt)``, so e.g. a Portuguese item with a Chinese option gets it), else the language's."""
    return ANSWER_INSTRUCTION["zh" if language == "zh" or contains_chinese(prompt_text) else language]


def canonical_language(code: str) -> str:
    """Map a language code (``cn`` or ``zh`` for Chinese, case-insensitive) to its canonical form."""
    key = code.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown MMMB language {code!r}; expected one of {sorted(_ALIASES)}")
    return _ALIASES[key]
