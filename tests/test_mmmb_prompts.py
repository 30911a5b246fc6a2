"""MCQ prompt text as the official Parrot VLMEvalKit adapter builds it (AIDC-AI/Parrot,
VLMEvalKit/vlmeval/vlm/parrot.py, `build_multi_choice_prompt`)."""

from __future__ import annotations

import pytest

from mmmb.languages import ANSWER_INSTRUCTION, LANGUAGES, answer_instruction, contains_chinese
from mmmb.prompts import mcq_prompt_text

# The official adapter's instructions, quoted from `build_multi_choice_prompt` (the English one is VLMEvalKit's).
OFFICIAL = {
    "en": "Answer with the option's letter from the given choices directly.",
    "zh": "请直接用给定选项中的选项字母回答。",
    "pt": "Responda diretamente com a letra da opção das escolhas dadas.",
    "ar": "أجب مباشرةً بحرف الخيار من الاختيارات المعطاة.",
    "ru": "Ответьте буквой варианта из предложенных вариантов напрямую.",
    "tr": "Verilen seçeneklerden doğrudan seçeneğin harfi ile cevap verin.",
}


def official_prompt(question: str, options: dict[str, str], language: str, hint: str | None = None) -> str:
    """The official adapter's control flow, transcribed: hint, question, "\\nX. text" per option, then the
    instruction of the dataset's language, Chinese when the suffix is _zh or the prompt holds a Chinese character."""
    prompt = (hint + "\n" + question) if hint is not None else question
    for key, item in options.items():
        prompt += f"\n{key}. {item}"
    chinese = any("\u4e00" <= ch <= "\u9fa5" for ch in prompt)
    return prompt + "\n" + OFFICIAL["zh" if language == "zh" or chinese else language]


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("hint", [None, "Look at the shapes."])
def test_the_prompt_is_the_official_adapters(language, hint):
    options = {"A": "red", "B": "blue", "C": "green"}
    assert ANSWER_INSTRUCTION[language] == OFFICIAL[language]
    assert mcq_prompt_text("What colour?", list(options.items()), language, hint) == \
        official_prompt("What colour?", options, language, hint)


def test_a_chinese_character_anywhere_gives_the_chinese_instruction():
    """The official rule (`cn_string(prompt)`): a Portuguese item with a Chinese option ends in Chinese."""
    options = {"A": "vermelho", "B": "汉字"}
    text = mcq_prompt_text("Qual cor?", list(options.items()), "pt")
    assert text.endswith(OFFICIAL["zh"]) and text == official_prompt("Qual cor?", options, "pt")
    assert answer_instruction("pt", "Qual cor?\nA. vermelho") == OFFICIAL["pt"]
    assert contains_chinese("一") and contains_chinese("龥") and not contains_chinese("Ответ 〇 ｱ")
