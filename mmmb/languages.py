"""The six MMMB languages, their file-name codes and the answer instruction in each language.

MMMB (Parrot, Sun et al. 2024, Sec. 4) ships one VLMEvalKit MCQ TSV per language. The official files and
VLMEvalKit dataset names use ``cn`` for Chinese (``mmmb_cn.tsv``, ``MMMB_cn``); this package uses ``zh``
internally and accepts both spellings on input.
"""
from __future__ import annotations

LANGUAGES: tuple[str, ...] = ("en", "zh", "pt", "ar", "tr", "ru")

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "zh": "Chinese", "pt": "Portuguese", "ar": "Arabic", "tr": "Turkish", "ru": "Russian",
}

# Spellings accepted in file names / CLI arguments → canonical code.
_ALIASES: dict[str, str] = {code: code for code in LANGUAGES} | {"cn": "zh"}

# VLMEvalKit's dataset suffix for each canonical code (``MMMB_cn`` is VLMEvalKit's name for Chinese).
VLMEVALKIT_CODE: dict[str, str] = {code: ("cn" if code == "zh" else code) for code in LANGUAGES}

# The VLMEvalKit MCQ instruction ("Answer with the option's letter ..."), written in each language so the
# whole prompt stays in the item's language.
ANSWER_INSTRUCTION: dict[str, str] = {
    "en": "Answer with the option's letter from the given choices directly.",
    "zh": "请直接回答选项字母。",
    "pt": "Responda diretamente com a letra da opção correta entre as alternativas dadas.",
    "ar": "أجب مباشرة بحرف الخيار الصحيح من بين الخيارات المعطاة.",
    "tr": "Verilen seçenekler arasından doğrudan doğru seçeneğin harfiyle cevap verin.",
    "ru": "Ответьте сразу буквой правильного варианта из предложенных.",
}


def canonical_language(code: str) -> str:
    """Map a language code (``cn`` or ``zh`` for Chinese, case-insensitive) to its canonical form."""
    key = code.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown MMMB language {code!r}; expected one of {sorted(_ALIASES)}")
    return _ALIASES[key]
