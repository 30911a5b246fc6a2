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
