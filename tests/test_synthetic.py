import hashlib
import io
import re
from collections import Counter

import numpy as np
import pytest

from parrot.data.synthetic import (
    LANGUAGES,
    MCQ_CATEGORIES,
    RGB,
    Scene,
    SceneObject,
    corpus_texts,
    make_conversation_records,
    make_mcq_items,
    render_scene,
    sample_scene,
)
from parrot.data.phrasebook import phrasebook

SCRIPTS = {  # a character class every text of the language must contain
    "zh": r"[\u4e00-\u9fff]",
    "ar": r"[\u0600-\u06ff]",
    "ru": r"[\u0400-\u04ff]",
    "en": r"^[\x00-\x7f]+$",
}
UNIFORM = {lang: 1.0 for lang in LANGUAGES}
NUMBERS_EN = ["One", "Two", "Three", "Four", "Five"]


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_records_are_deterministic_and_prefix_stable(tmp_path):
    a = make_conversation_records(12, seed=3, stage="qa", image_dir=tmp_path / "a", max_turns=3)
    b = make_conversation_records(12, seed=3, stage="qa", image_dir=tmp_path / "b", max_turns=3)
    assert a == b
    for record in a:
        assert (tmp_path / "a" / record["image"]).read_bytes() == (tmp_path / "b" / record["image"]).read_bytes()
    assert make_conversation_records(5, seed=3, stage="qa", max_turns=3) == a[:5]  # item i independent of n
    other = make_conversation_records(12, seed=4, stage="qa", max_turns=3)
    assert [r["conversations"] for r in other] != [r["conversations"] for r in a]


def test_record_format_is_llava(tmp_path):
    records = make_conversation_records(20, seed=0, stage="qa", image_dir=tmp_path, max_turns=3)
    for record in records:
        assert (tmp_path / record["image"]).is_file()
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert all(t["value"].strip() for t in turns)
        assert len(record["kinds"]) == len(turns) // 2
    assert max(len(r["conversations"]) for r in records) > 2  # multi-turn occurs


@pytest.mark.parametrize("stage", ["caption", "qa"])
def test_every_language_present_in_its_script(stage):
    records = make_conversation_records(120, seed=1, stage=stage, language_weights=UNIFORM)
    by_lang = {}
    for r in records:
        by_lang.setdefault(r["lang"], []).append(r)
    assert set(by_lang) == set(LANGUAGES)
    for lang, pattern in SCRIPTS.items():
        for r in by_lang[lang]:
            for turn in r["conversations"]:
                text = turn["value"].replace("<image>\n", "")
                assert re.search(pattern, text), (lang, text)
    # Latin-script languages differ in vocabulary, not only by tag: few shared human prompts.
    prompts = {lang: {r["conversations"][0]["value"] for r in rs} for lang, rs in by_lang.items()}
    for a in LANGUAGES:
        for b in LANGUAGES:
            if a < b:
                assert not prompts[a] & prompts[b], (a, b)


def test_default_stage2_mix_is_english_heavy():
    records = make_conversation_records(1000, seed=0, stage="qa")
    counts = Counter(r["lang"] for r in records)
    assert abs(counts["en"] / 1000 - 0.6) < 0.05
    for lang in LANGUAGES[1:]:
        assert abs(counts[lang] / 1000 - 0.08) < 0.03


def test_grammar_agreement_in_captions():
    def scene(shape, colour, size, positions):
        return Scene("white", tuple(SceneObject(shape, colour, size, p) for p in positions))

    circles = scene("circle", "red", "large", ["left", "right"])
    stars = scene("star", "yellow", "small", ["left", "right"])
    ru, pt, ar, tr, zh = (phrasebook(x) for x in ("ru", "pt", "ar", "tr", "zh"))
    assert ru.group_phrase(circles.groups[0], False) == "два больших красных круга"
    assert ru.group_phrase(stars.groups[0], False) == "две маленькие жёлтые звезды"
    assert pt.group_phrase(stars.groups[0], False) == "duas estrelas amarelas pequenas"
    assert pt.group_phrase(circles.groups[0], False) == "dois círculos vermelhos grandes"
    assert ar.group_phrase(circles.groups[0], False) == "دائرتان حمراوان كبيرتان"
    three_squares = scene("square", "blue", "small", ["left", "right", "top"])
    assert ar.group_phrase(three_squares.groups[0], False) == "ثلاثة مربعات زرقاء صغيرة"  # polarity, fem sg adj
    assert tr.group_phrase(three_squares.groups[0], False) == "üç küçük mavi kare"  # no plural after numerals
    assert zh.group_phrase(circles.groups[0]) == "两个红色的大圆形"


def test_scene_rules_are_enforced():
    with pytest.raises(ValueError, match="share a position"):
        Scene("white", (SceneObject("circle", "red", "large", "left"), SceneObject("star", "blue", "large", "left")))
    with pytest.raises(ValueError, match="share colour and size"):
        Scene("white", (SceneObject("circle", "red", "large", "left"), SceneObject("circle", "blue", "large", "top")))
    with pytest.raises(ValueError, match="different colours"):
        Scene("white", (SceneObject("circle", "red", "large", "left"), SceneObject("star", "red", "large", "top")))


def test_render_places_colours_where_the_scene_says():
    scene = Scene("gray", (SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "small", "top")))
    pixels = np.asarray(render_scene(scene, size=100)).astype(int)  # (H, W, 3), index [y, x]
    assert np.abs(pixels[50, 20] - RGB["red"]).max() <= 2
    assert np.abs(pixels[20, 50] - RGB["blue"]).max() <= 2
    assert np.abs(pixels[80, 80] - RGB["gray"]).max() <= 2  # empty bottom-right corner
    assert np.abs(pixels[50, 50] - RGB["gray"]).max() <= 2  # nothing in the centre


def test_mcq_items_same_in_all_languages_and_balanced():
    items = make_mcq_items(120, seed=0)
    assert Counter(it.category for it in items) == {c: 8 for c in MCQ_CATEGORIES}
    assert Counter(it.answer for it in items) == {letter: 30 for letter in "ABCD"}
    for block in range(0, 120, 4):
        assert sorted(it.answer for it in items[block:block + 4]) == list("ABCD")
    for it in items:
        assert set(it.questions) == set(LANGUAGES) == set(it.options)
        assert len(set(it.questions.values())) == len(LANGUAGES)  # really translated
        for lang in LANGUAGES:
            assert len(it.options[lang]) == 4 and len(set(it.options[lang])) == 4
        for lang, pattern in SCRIPTS.items():
            assert re.search(pattern, it.questions[lang]), (lang, it.questions[lang])


def test_mcq_answers_match_an_independent_reading_of_the_scene():
    items = make_mcq_items(150, seed=2)
    checked = Counter()
    for it in items:
        objects = it.scene.objects
        right = it.options["en"]["ABCD".index(it.answer)]
        question = it.questions["en"]
        if it.category == "total_count":
            assert right == NUMBERS_EN[len(objects) - 1]
        elif it.category == "background":
            assert right.lower() == it.scene.background
        elif it.category == "count":
            shape = next(o.shape for o in objects if re.search(rf"\b{o.shape}(e?s)?\b", question))
            assert right == NUMBERS_EN[sum(o.shape == shape for o in objects) - 1]
        elif it.category == "colour":
            colours = {o.colour for o in objects if re.search(rf"\b{o.shape}(e?s)?\b", question)}
            assert colours == {right.lower()}
        elif it.category == "shape_absence":
            assert right.lower() not in {o.shape for o in objects}
            wrong = [o.lower() for o in it.options["en"] if o != right]
            assert all(w in {o.shape for o in objects} for w in wrong)
        elif it.category == "largest_shape":
            assert {o.shape for o in objects if o.size == "large"} == {right.lower()}
        else:
            continue
        checked[it.category] += 1
    assert len(checked) == 6 and min(checked.values()) == 10


def test_benchmark_images_differ_from_training_images(tmp_path):
    train = make_conversation_records(150, seed=0, stage="qa", image_dir=tmp_path)
    train_hashes = {hashlib.sha1((tmp_path / r["image"]).read_bytes()).hexdigest() for r in train}
    bench_hashes = {hashlib.sha1(_png_bytes(it.image)).hexdigest() for it in make_mcq_items(150, seed=0)}
    assert len(train_hashes) == 150 and len(bench_hashes) == 150
    assert not train_hashes & bench_hashes


def test_mcq_deterministic():
    a, b = make_mcq_items(20, seed=5), make_mcq_items(20, seed=5)
    assert [(x.answer, x.questions, x.options) for x in a] == [(x.answer, x.questions, x.options) for x in b]
    assert all(_png_bytes(x.image) == _png_bytes(y.image) for x, y in zip(a, b))


def test_corpus_texts_cover_languages_deterministically():
    texts = corpus_texts(seed=0, n=60)
    assert texts == corpus_texts(seed=0, n=60)
    for lang, pattern in SCRIPTS.items():
        own = texts[LANGUAGES.index(lang)::len(LANGUAGES)]
        assert all(re.search(pattern, t) for t in own)


def test_sample_scene_respects_world_limits():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert 1 <= len(scene.objects) <= 5
        assert 1 <= len(scene.groups) <= 3
        assert all(1 <= g.count <= 4 for g in scene.groups)


def test_mcq_wording_does_not_depend_on_requested_languages():
    all_six = make_mcq_items(6, seed=3)
    two = make_mcq_items(6, seed=3, languages=("en", "tr"))
    for full, subset in zip(all_six, two):
        assert subset.questions == {lang: full.questions[lang] for lang in ("en", "tr")}
        assert subset.options == {lang: full.options[lang] for lang in ("en", "tr")}
