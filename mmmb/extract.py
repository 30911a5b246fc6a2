r"""Answer extraction for generated MCQ outputs in the six MMMB languages (exact matching, no LLM judge).

Follows VLMEvalKit's exact-matching idea (``can_infer_option`` then ``can_infer_text``) and adds answer cues in
en/zh/pt/ar/tr/ru. Rules, applied in order; the first that decides wins:

1. the whole output is one letter, possibly wrapped: ``B``, ``B.``, ``(B)``, ``B)``, ``**B**``;
2. a strong answer cue followed by a letter ("answer is", "答案是", "选", "الإجابة هي", "Cevap", "Ответ:",
   "A resposta é", ...);
3. a label opening the output ("B. blue\nbecause ...", "(C)\n..."), unless several lines open with labels;
4. a weak cue followed by a letter ("option", "选项", "вариант", "seçenek", "opção", "الخيار");
5. option letters standing alone in the text (``B) red``, ``B选项``, ``B seçeneği``), after masking the option
   texts so "Vitamin C" is not read as letter C, and skipping article/pronoun use ("A red car", "I think");
6. the text of exactly one option appears (nested matches such as "red" inside "dark red" count once); Arabic
   spellings are folded (hamza forms of alef, short vowels, alef maqsura) and the article or a clitic written onto
   the word is allowed ("اللون الأزرق" is the option "أزرق").

In rules 2, 4 and 5 a letter that is also a word (en/pt "A", en "I", tr "O", Russian "В"/"А"/"С") followed by
a lower-case word is read as that word ("Answer: A blue square", "Ответ: В центре ..."); a second letter joined
by "or"/","/"или"... counts only if it is a valid option and not such a word ("The answer is C, I think").

Two different letters (or options) at the deciding rule → ambiguous → ``None`` (scored as wrong, reported as
"no answer"); a second letter counts however it is wrapped or joined ("(A) and (B)", "**A** or **B**", "A、B",
"A ile B", "A وB", "A\nB"). A letter that is not among the item's options also gives ``None``, unless it is the
whole text of one option ("X" when the options are X / Y / Z / W).

Before matching, the output is NFKC-normalised (full-width "Ａ", "（Ｂ）" → "A", "(B)"), invisible format characters
(right-to-left marks around Arabic text, zero-width spaces) are dropped and Arabic-Indic / Persian digits read as
ASCII; Cyrillic look-alikes (А В С Е, also lower-case) count as Latin letters everywhere (outside a cue too:
"Я думаю, В.").
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

from mmmb.tsv import OPTION_LETTERS

# Characters that glue to a letter and make it part of a word (Latin incl. accents, Cyrillic, Arabic letters,
# marks and digits). The Arabic block also holds punctuation (، ؛ ؟ ۔ ٪ ...), left out so that "B،" is the
# letter B followed by a comma, as "B," is.
_WORD_CHARS = (r"0-9A-Za-z\u00C0-\u024F\u0400-\u04FF"
               r"\u0610-\u061A\u0620-\u0669\u066E-\u06D3\u06D5-\u06DC\u06DF-\u06E8\u06EA-\u06FC\u06FF")
_ARABIC_PUNCTUATION = "\u060C\u061B\u061F\u06D4"  # ، ؛ ؟ ۔
# Look-alikes a model may write in Russian/Arabic: Cyrillic А В С Е (and а в с е), Arabic abjad option labels
# أ ب ج د.
_HOMOGLYPHS: dict[str, str] = {"А": "A", "В": "B", "С": "C", "Е": "E", "а": "A", "в": "B", "с": "C", "е": "E",
                               "أ": "A", "ب": "B", "ج": "C", "د": "D"}
_WRAPPING = " \t\r\n.,:;!?。，、：；！？()（）[]【】「」<>*_\"'`“”‘’«»-—–=#" + _ARABIC_PUNCTUATION

_STRONG_CUES = "|".join([
    # en
    r"(?:correct\s+|final\s+|right\s+)?answer(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?",
    r"(?:correct|right|best)\s+(?:option|choice|letter)(?:\s+is)?",
    r"(?:i\s+(?:would\s+)?)?(?:choose|select|pick|go\s+with)",
    # zh
    r"答案(?:应该|应|應該)?(?:是|为|為|选|選)?", r"正确(?:答案|选项|選項)(?:是|为)?", r"我?(?:选择|选|選擇|選)",
    # pt
    r"resposta(?:\s+(?:correta|certa|final))?(?:\s+(?:é|seria|será))?", r"(?:eu\s+)?escolh(?:o|eria)",
    # ar
    r"(?:الإجابة|الاجابة|الجواب)(?:\s+(?:الصحيحة|الصحيح))?(?:\s+(?:هي|هو))?", r"(?:أختار|اختار)",
    # tr
    r"(?:doğru\s+)?(?:cevap|cevab\w*|yanıt\w*)(?:\s+(?:şudur|budur))?", r"seçiyorum",
    # ru
    r"(?:правильный\s+|верный\s+)?ответ(?:\s*(?:—|-|это))?", r"(?:я\s+)?выбираю",
])
_WEAK_CUES = "|".join([
    r"(?:option|choice|letter)(?:\s+is)?", r"选项|選項", r"opção|alternativa|letra", r"(?:الخيار|الاختيار|الحرف)",
    r"seçenek\w*|şık\w*", r"вариант\w*|буква",
])
_FILLER = r"[\s:：\-—–=\"'“”«»„‘’`*_\(\[（【「]*"
_FILLER_WORDS = (r"(?:(?:(?:the|an|a|o|la)\s+)?(?:option|choice|letter|选项|選項|opção|alternativa|letra|"
                 r"الخيار|الحرف|seçenek|şık|вариант|буква)" + _FILLER + r")?")
# Upper-case Latin letter or a homoglyph; a lower-case one (Latin, or a Cyrillic look-alike) only when nothing
# word-like follows ("answer: b.", "ответ: с").
_LETTER = (rf"(?P<letter>[A-Z]|[АВСЕ]|[أبجد]|[a-zавсе](?=\s*(?:$|[.,;:!?)\]。，；：！？）{_ARABIC_PUNCTUATION}])))"
           rf"(?![{_WORD_CHARS}])")
# What may join a second letter to a cue's letter ("B or C", "B, C", "B/C", "B، C", "A、B", "(A) and (B)",
# "**A** or **B**", "A وB"): both count (ambiguous). Wrapping around either letter does not hide the second one.
_CLOSING_WRAP = r"[)\]）】」*_\"'”’»]*"
_OPENING_WRAP = r"[(\[（【「*_\"'“‘«]*"
_CONJUNCTION = re.compile(
    rf"{_CLOSING_WRAP}\s*(?P<joiner>[,/\u060C、]|(?i:or|nor|and|или|и|veya|ya\s+da|ve|ile|ou|e|أو)\s|و\s*"
    rf"|或者?|和|与|及)\s*{_OPENING_WRAP}(?P<letter>[A-Z]|[АВСЕ]|[أبجد])(?![{_WORD_CHARS}])"
)
_COMMAS = frozenset(",\u060C、")


def _cue_pattern(cues: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![{_WORD_CHARS}])(?i:{cues}){_FILLER}{_FILLER_WORDS}{_LETTER}")


_CUE_TIERS: tuple[re.Pattern[str], ...] = (_cue_pattern(_STRONG_CUES), _cue_pattern(_WEAK_CUES))
# "B. blue\nbecause ..." / "(C)\n..." : an answer given as a label at the very start of the output. A line
# that is a label or a bare letter ("A\nB") counts as another label (several → echoed options or ambiguous).
_LEADING_LABEL = re.compile(r"^[\s*_(\[（【]*(?P<letter>[A-Z]|[АВСЕ])[*_]*(?:[.)\]:：）】]|\s*\n|\s*$)")
_LINE_LABEL = re.compile(r"(?m)^[\s*_(\[（【]*(?P<letter>[A-Z]|[АВСЕ])[*_]*(?:[.)\]:：）】]|[ \t]*$)")
_STANDALONE = re.compile(rf"(?<![{_WORD_CHARS}])(?P<letter>[A-Z]|[АВСЕ])(?![{_WORD_CHARS}])")
# Letters that are also words: en/pt article "A", pt "E" (and), en "I", tr "O"; Russian "А" (but), "В" (in),
# "С" (with), "Е". Followed by a lower-case word of their script they are read as words ("A blue square",
# "I think", "В центре") unless that word says the letter is the answer ("A is correct", "B şıkkı").
_LATIN_WORD_LETTERS = frozenset("AEIO")
_CYRILLIC_WORD_LETTERS = frozenset("АВСЕ")
_FOLLOWING_LATIN_WORD = re.compile(r"\s+([a-zà-ɏ]+)")
# Russian В/С/А also read as words before a capitalised noun or a number on the same line ("В Москве",
# "С 3 яблоками"; not "Ответ: А\nОтвет: В").
_FOLLOWING_CYRILLIC_WORD = re.compile(r"\s+([а-яё]+)|[^\S\n]+([А-ЯЁ][а-яё]+|\d+)")
# A word after a letter, any script: a lower-case one after "B, C" starts a new clause ("B, A is wrong").
_FOLLOWING_ANY_WORD = re.compile(r"\s+([^\W\d_]+)")
_CONJUNCTION_WORDS = frozenset({"or", "nor", "and", "ou", "e", "veya", "ve", "ya", "ile", "или", "и"})  # "A or B"
_CONFIRMING_WORDS = _CONJUNCTION_WORDS | frozenset({
    "is", "was", "seems", "would", "should", "matches", "fits", "correct", "right",
    "é", "está", "parece", "seria", "correta", "certa",
    "şıkkı", "şıkkıdır", "seçeneği", "seçeneğidir", "doğru", "doğrudur", "olmalı",
    "верно", "верный", "правильно", "правильный",
})


# Arabic-Indic (٠-٩) and Extended Arabic-Indic / Persian (۰-۹) digits read as ASCII digits, so "٣" matches the
# option "3" (and "3" the option "٣"). NFKC leaves both untouched.
_DIGITS = str.maketrans("٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹", "01234567890123456789")


def _normalize(text: str) -> str:
    """NFKC (full-width Ａ （ ） → A ( )), invisible format characters dropped (right-to-left / left-to-right marks
    and embeddings around Arabic text, zero-width joiners, BOM), Arabic-Indic and Persian digits as ASCII."""
    text = unicodedata.normalize("NFKC", text).translate(_DIGITS)
    return "".join(char for char in text if unicodedata.category(char) != "Cf").strip()


def _to_letter(raw: str) -> str:
    return _HOMOGLYPHS.get(raw, raw.upper())


def _decide(letters: set[str], valid: str) -> tuple[bool, str | None]:
    """(decided, answer): nothing found → undecided; one valid letter → it; else decided as no answer."""
    if not letters:
        return False, None
    if len(letters) == 1:
        (letter,) = letters
        return True, letter if letter in valid else None
    return True, None


def _letter_options(options: Sequence[str], valid: str) -> dict[str, str]:
    """{letter: label} of options whose whole text is one letter that is not itself a label ("Which letter is
    shown?" X / Y / Z / W): "X" or "The answer is X" names option A by its text, as VLMEvalKit's text match does."""
    named: dict[str, list[str]] = {}
    for label, option in zip(valid, options):
        key = _option_key(option)
        if len(key) == 1 and (key.isascii() and key.isalpha() or key in _HOMOGLYPHS):
            named.setdefault(_to_letter(key), []).append(label)
    return {letter: labels[0] for letter, labels in named.items() if len(labels) == 1 and letter not in valid}


def _whole_text_letter(text: str) -> str | None:
    core = text.strip(_WRAPPING)
    return _to_letter(core) if len(core) == 1 and (core.isascii() and core.isalpha() or core in _HOMOGLYPHS) else None


def _leading_label(text: str, valid: str) -> str | None:
    """The label that opens the output, unless several lines open with different labels (echoed options, or
    "A\nB"); "" (decided, no answer) when a second label is joined to it ("(A) or (B)", "A), B)")."""
    match = _LEADING_LABEL.match(text)
    if match is None or len({_to_letter(m.group("letter")) for m in _LINE_LABEL.finditer(text)}) > 1:
        return None
    letter = _to_letter(match.group("letter"))
    second = _alternative_letter(text, match.end(), valid)
    return "" if second is not None and second != letter else letter


def _reads_as_word(text: str, raw_letter: str, end: int) -> bool:
    """Whether ``raw_letter`` (ending at ``end``) is a word rather than an option label: a letter that is
    also a word, followed by a lower-case word of its script that does not confirm it ("A blue square")."""
    if raw_letter in _LATIN_WORD_LETTERS:
        following = _FOLLOWING_LATIN_WORD.match(text, end)
    elif raw_letter in _CYRILLIC_WORD_LETTERS:
        following = _FOLLOWING_CYRILLIC_WORD.match(text, end)
    else:
        return False
    return following is not None and following.group(following.lastindex) not in _CONFIRMING_WORDS


def _alternative_letter(text: str, position: int, valid: str) -> str | None:
    """A second letter joined to the cue's letter ending at ``position`` ("B or C"), if it is really one."""
    match = _CONJUNCTION.match(text, position)
    if match is None:
        return None
    raw, letter = match.group("letter"), _to_letter(match.group("letter"))
    # Not an option ("B, I think" with four options), or a word ("B and I am sure"): no second answer.
    if letter not in valid or _reads_as_word(text, raw, match.end()):
        return None
    # After a comma, a letter followed by a lower-case word opens a new clause ("B, A is wrong"), unless
    # the word continues the list ("B, C or D").
    following = _FOLLOWING_ANY_WORD.match(text, match.end())
    if (match.group("joiner") in _COMMAS and following is not None and following.group(1).islower()
            and following.group(1) not in _CONJUNCTION_WORDS):
        return None
    return letter


def _cue_letters(text: str, pattern: re.Pattern[str], valid: str) -> set[str]:
    letters = set()
    for match in pattern.finditer(text):
        if _reads_as_word(text, match.group("letter"), match.end()):
            continue  # "Answer: A blue square": the article, not option A
        letters.add(_to_letter(match.group("letter")))
        alternative = _alternative_letter(text, match.end(), valid)
        if alternative is not None:  # "the answer is B or C"
            letters.add(alternative)
    return letters


def _option_key(option: str) -> str:
    return " ".join(_normalize(option).strip(_WRAPPING).split())


# Arabic spellings folded for option-text matching: short vowels / tashkeel and tatweel dropped, the hamza forms of
# alef (أ إ آ ٱ) as bare alef, alef maqsura and Persian yeh as yeh, Persian kaf as kaf ("ازرق" is "أزرق").
_ARABIC_MARKS = re.compile(r"[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06DC\u06DF-\u06E8\u06EA-\u06ED\u0640]")
_ARABIC_FOLD = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "ی": "ي", "ک": "ك"})
_ARABIC_START = re.compile(r"[\u0620-\u064A\u066E-\u06D3]")
_ARABIC_ARTICLE = "ال"


def _fold_arabic(text: str) -> str:
    return _ARABIC_MARKS.sub("", text).translate(_ARABIC_FOLD)


def _option_pattern(key: str) -> str:
    """Regex of an option text inside an answer. Alphabetic edges need word boundaries ("red" must not match
    "bored"); CJK text has no spaces. An Arabic word may carry the article and clitics written onto it ("الأزرق",
    "بالأحمر", "وأخضر"), and an option given with the article also matches without it."""
    left = rf"(?<![{_WORD_CHARS}])" if re.match(rf"[{_WORD_CHARS}]", key[0]) else ""
    right = rf"(?![{_WORD_CHARS}])" if re.match(rf"[{_WORD_CHARS}]", key[-1]) else ""
    if not _ARABIC_START.match(key):
        return left + re.escape(key) + right
    if key.startswith(_ARABIC_ARTICLE) and len(key) > len(_ARABIC_ARTICLE) + 2:
        key = key[len(_ARABIC_ARTICLE):]
    # one-letter clitics (و ف ب ل ك) only before words of 3+ letters: "بعد" (after) is no "ب" + option "عد"
    prefix = r"(?:[وفبك]?ال|لل|[وفبلك])?" if len(key) >= 3 else r"(?:[وفبك]?ال)?"
    return left + prefix + re.escape(key) + right


def _option_spans(text: str, options: Sequence[str]) -> tuple[list[tuple[int, int, int]], str]:
    """(start, end, option position) of every option text found in ``text`` (case-insensitive, Arabic spellings
    folded), and the whitespace-collapsed text the offsets refer to. Case-insensitive matching rather than
    ``casefold`` keeps offsets stable (Turkish "İ" casefolds to two code points)."""
    haystack = _fold_arabic(" ".join(text.split()))
    spans = []
    for position, option in enumerate(options):
        key = _fold_arabic(_option_key(option))
        if not key:
            continue
        for match in re.finditer(_option_pattern(key), haystack, flags=re.IGNORECASE):
            spans.append((match.start(), match.end(), position))
    return spans, haystack


def _outermost(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0])
                                        for o in spans)]


def _standalone_letters(text: str, options: Sequence[str], valid: str) -> set[str]:
    spans, haystack = _option_spans(text, [o for o in options if len(_option_key(o)) > 1])
    masked = list(haystack)
    for start, end, _ in spans:
        masked[start:end] = " " * (end - start)
    masked_text = "".join(masked)
    letters = set()
    for match in _STANDALONE.finditer(masked_text):
        raw = match.group("letter")
        letter = _to_letter(raw)
        if letter not in valid:
            continue
        if _reads_as_word(masked_text, raw, match.end()):
            continue  # "A blue car", "В центре"
        letters.add(letter)
    return letters


def _option_text_letters(text: str, options: Sequence[str]) -> set[str]:
    spans, _ = _option_spans(text, options)
    return {OPTION_LETTERS[position] for _, _, position in _outermost(spans)}


def extract_answer(text: str, options: Sequence[str]) -> str | None:
    """The option letter a model's free-form ``text`` commits to, or ``None`` (no answer / ambiguous).

    ``options`` are the option texts in letter order (``options[0]`` is A).
    """
    valid = OPTION_LETTERS[: len(options)]
    text = _normalize(text)
    if not text:
        return None
    named = _letter_options(options, valid)  # letters that are option texts, not labels

    def labels(letters: set[str]) -> set[str]:
        return {named.get(letter, letter) for letter in letters}

    whole = _whole_text_letter(text)
    if whole is not None:
        whole = named.get(whole, whole)
        return whole if whole in valid else None
    strong, weak = _CUE_TIERS
    decided, answer = _decide(labels(_cue_letters(text, strong, valid + "".join(named))), valid)
    if decided:
        return answer
    leading = _leading_label(text, valid)
    if leading == "":
        return None
    if leading is not None:
        leading = named.get(leading, leading)
        return leading if leading in valid else None
    decided, answer = _decide(labels(_cue_letters(text, weak, valid + "".join(named))), valid)
    if decided:
        return answer
    decided, answer = _decide(_standalone_letters(text, options, valid), valid)
    if decided:
        return answer
    return _decide(_option_text_letters(text, options), valid)[1]
