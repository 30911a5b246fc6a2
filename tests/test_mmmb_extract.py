"""Answer extraction on hand-written model outputs in the six MMMB languages (issue 5 acceptance)."""
import pytest

from mmmb.extract import extract_answer

EN = ["red", "blue", "green", "dark red"]
ZH = ["红色", "蓝色", "绿色", "黄色"]
PT = ["vermelho", "azul", "verde", "amarelo"]
AR = ["أحمر", "أزرق", "أخضر", "أصفر"]
TR = ["kırmızı", "mavi", "yeşil", "sarı"]
RU = ["красный", "синий", "зелёный", "жёлтый"]
VITAMINS = ["Vitamin C", "Vitamin D", "Iron", "Zinc"]
YES_NO = ["yes", "no"]

NO = None  # no answer: empty, unparseable or ambiguous output (scored as wrong)

CASES = [
    # English: bare letters and wrappings
    ("B", EN, "B"), ("B.", EN, "B"), ("(C)", EN, "C"), ("D)", EN, "D"), ("**A**", EN, "A"), ("b", EN, "B"),
    (" c \n", EN, "C"),
    # English: letters inside sentences
    ("The answer is B", EN, "B"), ("The answer is B.", EN, "B"), ("B) blue", EN, "B"), ("Answer: C", EN, "C"),
    ("I think the correct answer is (D) dark red.", EN, "D"), ("A is correct.", EN, "A"), ("Option C", EN, "C"),
    ("The answer is b.", EN, "B"), ("Answer: B, not C", EN, "B"), ("C is the right choice", EN, "C"),
    ("The answer is option D.", EN, "D"), ("I would choose B because the sky is blue.", EN, "B"),
    ("B\nExplanation: option A is wrong because the square is blue.", EN, "B"),
    ("(C)\nThe square is green.", EN, "C"), ("D: dark red, since it is darker", EN, "D"),
    ("A. red\nB. blue\nC. green", EN, NO), ("The correct option is C, not A.", EN, "C"),
    # English: option text only / article "A"
    ("blue", EN, "B"), ("It is green.", EN, "C"), ("dark red", EN, "D"), ("Red.", EN, "A"),
    ("A blue car is shown.", EN, "B"), ("The answer is a blue square", EN, "B"),
    # English: ambiguous / invalid
    ("A or B", EN, NO), ("A. red\nB. blue", EN, NO), ("The answer is B or C", EN, NO), ("E", EN, NO),
    ("", EN, NO), ("I don't know.", EN, NO), ("It's either red or blue.", EN, NO), ("The answer is E", EN, NO),
    ("Vitamin C", VITAMINS, "A"), ("The answer is Vitamin D", VITAMINS, "B"), ("A", YES_NO, "A"),
    ("C", YES_NO, NO),
    # Chinese
    ("选B", ZH, "B"), ("答案是C", ZH, "C"), ("答案：Ｄ", ZH, "D"), ("我选择A。", ZH, "A"), ("B选项", ZH, "B"),
    ("正确答案是（B）蓝色", ZH, "B"), ("蓝色", ZH, "B"), ("选项C", ZH, "C"), ("绿色的", ZH, "C"),
    ("A和B都对", ZH, NO), ("答案是A或B", ZH, NO), ("红色和蓝色", ZH, NO),
    # Portuguese
    ("A resposta é D", PT, "D"), ("A resposta correta é a alternativa B.", PT, "B"), ("Alternativa C", PT, "C"),
    ("azul", PT, "B"), ("Eu escolho A", PT, "A"), ("A cor é verde", PT, "C"), ("A resposta é B ou C", PT, NO),
    # Arabic
    ("الإجابة هي A", AR, "A"), ("الإجابة الصحيحة هي C", AR, "C"), ("الجواب: B", AR, "B"),
    ("الإجابة هي ب", AR, "B"), ("أزرق", AR, "B"), ("الخيار D", AR, "D"), ("A أو B", AR, NO),
    # Turkish
    ("Cevap B", TR, "B"), ("Doğru cevap: C", TR, "C"), ("Cevabım A", TR, "A"), ("B seçeneği", TR, "B"),
    ("mavi", TR, "B"), ("D şıkkı doğrudur", TR, "D"), ("O kırmızı", TR, "A"), ("Cevap B veya C", TR, NO),
    ("SARI", TR, "D"),
    # Russian (including the Cyrillic look-alike "В")
    ("Ответ: B", RU, "B"), ("Ответ: В", RU, "B"), ("Правильный ответ — C", RU, "C"), ("синий", RU, "B"),
    ("Вариант D", RU, "D"), ("Я выбираю A", RU, "A"), ("Зелёный", RU, "C"), ("A или B", RU, NO),
    ("красный или синий", RU, NO),
]


def test_table_is_large_and_covers_all_languages():
    assert len(CASES) >= 60
    for options in (EN, ZH, PT, AR, TR, RU):
        assert sum(case[1] is options for case in CASES) >= 7


@pytest.mark.parametrize(("output", "options", "expected"), CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_extract_answer(output, options, expected):
    assert extract_answer(output, options) == expected


# A letter that is also a word (article, pronoun, Russian preposition) after a cue or a conjunction is read as a
# word; a letter joined by a conjunction that is not an option, or that opens a new clause, is no second answer.
WORD_AFTER_CUE = [
    ("Answer: A blue square.", EN, "B"), ("A resposta é: A cor azul", PT, "B"), ("Resposta: A cor é azul.", PT, "B"),
    ("Ответ: В центре красный круг.", RU, "A"), ("Ответ: В центре синий квадрат.", RU, "B"),
    ("Ответ: А это красный.", RU, "A"), ("Cevap: O mavi.", TR, "B"),
    ("Answer: I think it's B", EN, "B"), ("Answer: I believe B.", EN, "B"),
    ("The answer is C, I think.", EN, "C"), ("The answer is B and I am sure.", EN, "B"),
    ("Answer: A, I believe", EN, "A"), ("The answer is B, A is wrong.", EN, "B"),
    # still letters: a confirming word follows, or a real second option makes the answer ambiguous
    ("Answer: A is correct", EN, "A"), ("Cevap: A şıkkı", TR, "A"), ("Ответ: В", RU, "B"),
    ("The answer is B, C or D", EN, NO), ("The answer is B and C", EN, NO), ("Ответ: А или В", RU, NO),
    ("Answer: B because it is blue", EN, "B"),
]


@pytest.mark.parametrize(("output", "options", "expected"), WORD_AFTER_CUE,
                         ids=[repr(c[0])[:40] for c in WORD_AFTER_CUE])
def test_word_letters_after_cues_and_conjunctions(output, options, expected):
    assert extract_answer(output, options) == expected


# Arabic comma, semicolon, question mark and full stop end a letter as their Latin twins do.
ARABIC_PUNCTUATION = [
    ("الإجابة هي C، وليس أحمر", AR, "C"), ("الإجابة هي B، لأن المربع ليس أحمر", AR, "B"),
    ("الجواب: D؛ اللون الأصفر", AR, "D"), ("B،", AR, "B"), ("الخيار B؟", AR, "B"), ("الإجابة هي A۔", AR, "A"),
    ("الإجابة هي B، C", AR, NO),
]


@pytest.mark.parametrize(("output", "options", "expected"), ARABIC_PUNCTUATION,
                         ids=[repr(c[0])[:40] for c in ARABIC_PUNCTUATION])
def test_arabic_punctuation_is_not_part_of_a_word(output, options, expected):
    assert extract_answer(output, options) == expected


# A second letter after a cue counts however the letters are wrapped or joined: "(A) and (B)", "**A** or **B**",
# Chinese 、, Turkish "ile", Arabic و written onto the letter, "neither A nor B"; a bare letter on a later line too.
SECOND_LETTER = [
    ("The answer is (A) and (B)", EN, NO), ("The answer is **A** or **B**", EN, NO), ("Answer: A) or B)", EN, NO),
    ("The answer is neither A nor B", EN, NO), ("A\nB", EN, NO), ("A\n\nC", EN, NO),
    ("答案是（A）和（B）", ZH, NO), ("答案是A、B", ZH, NO), ("A、B", ZH, NO),
    ("A resposta é (A) ou (B)", PT, NO), ("الإجابة هي A وB", AR, NO), ("الإجابة هي (أ) أو (ب)", AR, NO),
    ("Cevap A ile B", TR, NO), ("Cevap (A) veya (B)", TR, NO), ("Ответ: (А) или (В)", RU, NO),
    # no cue: a label opening the output with a second one joined to it
    ("(A) or (B)", EN, NO), ("A) or B)", EN, NO), ("A. or B.", EN, NO), ("(A), (B)", EN, NO),
    ("(B) and (C)", EN, NO), ("B) 或 C)", ZH, NO), ("(A) или (B)", RU, NO),
    # one answer, wrapped or repeated
    ("(B) and I am sure", EN, "B"), ("B. blue\nbecause it is the sky", EN, "B"),
    ("The answer is (B).", EN, "B"), ("B\nB", EN, "B"), ("答案是（C），因为是绿色", ZH, "C"),
    ("The answer is (B), A is wrong.", EN, "B"),
]


@pytest.mark.parametrize(("output", "options", "expected"), SECOND_LETTER,
                         ids=[repr(c[0])[:40] for c in SECOND_LETTER])
def test_a_wrapped_or_joined_second_letter_is_ambiguous(output, options, expected):
    assert extract_answer(output, options) == expected


NUMBERS = ["1", "2", "3", "4"]
ARABIC_NUMBERS = ["١", "٢", "٣", "٤"]
# Russian answers in Cyrillic look-alikes outside a cue, lower-case after a cue; Arabic-Indic / Persian digits
# against ASCII option texts (and back); invisible right-to-left marks between a cue and its letter.
SCRIPT_VARIANTS = [
    ("Я думаю, В.", RU, "B"), ("Думаю, что С.", RU, "C"), ("ответ: с", RU, "C"), ("ответ: в.", RU, "B"),
    ("**В**: синий", RU, "B"), ("Я думаю, А или В.", RU, NO), ("Ответ: А\nОтвет: В", RU, NO),
    ("В центре синий квадрат", RU, "B"), ("Ответ: В Москве", RU, NO),
    ("٣", NUMBERS, "C"), ("الإجابة هي ٣", NUMBERS, "C"), ("۲", NUMBERS, "B"), ("3", ARABIC_NUMBERS, "C"),
    ("الإجابة هي \u200fب", AR, "B"), ("Ответ:\u200b В", RU, "B"), ("\u202bالإجابة هي ج\u202c", AR, "C"),
]


@pytest.mark.parametrize(("output", "options", "expected"), SCRIPT_VARIANTS,
                         ids=[repr(c[0])[:40] for c in SCRIPT_VARIANTS])
def test_cyrillic_look_alikes_eastern_digits_and_bidi_marks(output, options, expected):
    assert extract_answer(output, options) == expected


LETTERS_SHOWN = ["X", "Y", "Z", "W"]  # "Which letter is on the sign?": option texts that are single letters
# An answer naming such an option by its text ("X") is that option, as VLMEvalKit's text match reads it; a label
# (A-D) is still a label.
LETTER_TEXTS = [
    ("X", LETTERS_SHOWN, "A"), ("(W)", LETTERS_SHOWN, "D"), ("The answer is Z.", LETTERS_SHOWN, "C"),
    ("答案是Y", LETTERS_SHOWN, "B"), ("Ответ: W", LETTERS_SHOWN, "D"), ("The answer is X or Y", LETTERS_SHOWN, NO),
    ("B", LETTERS_SHOWN, "B"), ("The answer is Q", LETTERS_SHOWN, NO), ("X", ["X", "X", "Y"], NO),
]


@pytest.mark.parametrize(("output", "options", "expected"), LETTER_TEXTS, ids=[repr(c[0])[:40] for c in LETTER_TEXTS])
def test_single_letter_option_texts(output, options, expected):
    assert extract_answer(output, options) == expected


AR_ARTICLE = ["الأحمر", "الأزرق", "الأخضر", "الأصفر"]
NOUNS = ["قطة", "كلب", "مستشفى", "سيارة", "عد"]
# Arabic option texts as models write them: with the article or a clitic written onto the word, without hamza on
# the alef, with short vowels, alef maqsura as yeh; an option given with the article found without it.
ARABIC_SPELLINGS = [
    ("اللون الأزرق", AR, "B"), ("الإجابة هي الأخضر", AR, "C"), ("ازرق", AR, "B"), ("أَزْرَق", AR, "B"),
    ("إحمر", AR, "A"), ("بالأحمر", AR, "A"), ("الأحمر والأزرق", AR, NO),
    ("أحمر", AR_ARTICLE, "A"), ("ازرق", AR_ARTICLE, "B"), ("الكلب", NOUNS, "B"), ("مستشفي", NOUNS, "C"),
    ("سيّارة", NOUNS, "D"), ("بعد ذلك", NOUNS, NO),
]


@pytest.mark.parametrize(("output", "options", "expected"), ARABIC_SPELLINGS,
                         ids=[repr(c[0])[:40] for c in ARABIC_SPELLINGS])
def test_arabic_option_texts_with_article_hamza_and_vowel_variants(output, options, expected):
    assert extract_answer(output, options) == expected
