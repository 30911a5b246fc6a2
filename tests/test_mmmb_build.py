"""mmmb.build: sources → six validated TSVs; round trip; index alignment enforced; synthetic MMMB."""
import json

import numpy as np
import pytest
from PIL import Image

from mmmb.build import main as build_main
from mmmb.build import records_from_source, write_mmmb
from mmmb.languages import LANGUAGES
from mmmb.tsv import OPTION_LETTERS, MMMBFormatError, read_mmmb, read_tsv

TRANSLATIONS = {  # "what colour is the square?" and two colours in each language
    "en": ("What colour is the square?", ["red", "blue", "green"]),
    "zh": ("正方形是什么颜色？", ["红色", "蓝色", "绿色"]),
    "pt": ("De que cor é o quadrado?", ["vermelho", "azul", "verde"]),
    "ar": ("ما لون المربع؟", ["أحمر", "أزرق", "أخضر"]),
    "tr": ("Kare ne renk?", ["kırmızı", "mavi", "yeşil"]),
    "ru": ("Какого цвета квадрат?", ["красный", "синий", "зелёный"]),
}
COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20)]


def _multilingual_source(tmp_path, n=5):
    (tmp_path / "img").mkdir()
    items = []
    for i in range(n):
        Image.new("RGB", (6, 6), COLOURS[i % 3]).save(tmp_path / "img" / f"{i}.png")
        items.append({
            "index": 10 + i, "image": f"img/{i}.png", "category": ["colour", "shape"][i % 2], "answer": "ABC"[i % 3],
            "question": {lang: q for lang, (q, _) in TRANSLATIONS.items()},
            "options": {("cn" if lang == "zh" else lang): o for lang, (_, o) in TRANSLATIONS.items()},
        })
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items, ensure_ascii=False))
    return path, items


def test_round_trip_build_then_read_gives_the_same_items(tmp_path):
    source, items = _multilingual_source(tmp_path)
    build_main(["--source", str(source), "--out", str(tmp_path / "out"), "--chinese-code", "cn"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"mmmb_{'cn' if lang == 'zh' else lang}.tsv" for lang in LANGUAGES)
    sets = read_mmmb([tmp_path / "out"])
    assert list(sets) == list(LANGUAGES)
    for lang, records in sets.items():
        question, options = TRANSLATIONS[lang]
        assert [r.index for r in records] == [item["index"] for item in items]
        for record, item in zip(records, items):
            assert (record.question, list(record.options)) == (question, options)
            assert (record.answer, record.category) == (item["answer"], item["category"])
            original = np.asarray(Image.open(tmp_path / item["image"]).convert("RGB"))
            assert np.array_equal(np.asarray(record.load_image()), original)


def test_english_plus_translations_folder_inherits_and_checks(tmp_path):
    source, items = _multilingual_source(tmp_path)
    folder = tmp_path / "per_language"
    folder.mkdir()
    english = [{k: v for k, v in item.items() if k not in ("question", "options")}
               | {"question": item["question"]["en"], "options": item["options"]["en"],
                  "image": "../" + item["image"]} for item in items]
    (folder / "en.json").write_text(json.dumps(english))
    zh = [{"index": item["index"], "question": TRANSLATIONS["zh"][0], "options": TRANSLATIONS["zh"][1]}
          for item in items]
    (folder / "cn.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in zh))
    sets = records_from_source(folder, ["en", "zh"])
    assert [r.answer for r in sets["zh"]] == [item["answer"] for item in items]
    assert sets["zh"][0].image_b64 == sets["en"][0].image_b64

    zh[2]["answer"] = "C" if items[2]["answer"] != "C" else "A"  # a translation that disagrees with English
    (folder / "cn.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in zh))
    with pytest.raises(MMMBFormatError) as error:
        records_from_source(folder, ["en", "zh"])
    assert error.value.file.endswith("cn.jsonl") and error.value.row == items[2]["index"]
    assert error.value.column == "answer"


def test_misaligned_translation_indices_are_an_error(tmp_path):
    _, items = _multilingual_source(tmp_path)
    folder = tmp_path / "langs"
    folder.mkdir()
    for lang in ("en", "tr"):
        question, options = TRANSLATIONS[lang]
        rows = [{"index": item["index"] + (1000 if lang == "tr" and k == 3 else 0), "question": question,
                 "options": options, "answer": item["answer"], "category": item["category"],
                 "image": "../" + item["image"]} for k, item in enumerate(items)]
        (folder / f"{lang}.json").write_text(json.dumps(rows, ensure_ascii=False))
    with pytest.raises(MMMBFormatError, match="not aligned|missing here") as error:
        records_from_source(folder, ["en", "tr"])
    assert error.value.file.endswith("tr.json") and error.value.column == "index"
    # write_mmmb enforces alignment too, whatever the records' origin
    sets = records_from_source(folder, ["en"]) | {"tr": records_from_source(folder, ["tr"])["tr"]}
    with pytest.raises(MMMBFormatError):
        write_mmmb(sets, tmp_path / "out")


@pytest.mark.parametrize(("mutate", "column"), [
    (lambda item: item.update(answer="D"), "answer"),
    (lambda item: item.update(image="img/missing.png"), "image"),
    (lambda item: item["options"].pop("ar"), "options.ar"),
    (lambda item: item.pop("category"), "category"),
])
def test_bad_source_items_are_located(tmp_path, mutate, column):
    source, items = _multilingual_source(tmp_path)
    mutate(items[1])
    source.write_text(json.dumps(items, ensure_ascii=False))
    with pytest.raises(MMMBFormatError) as error:
        records_from_source(source)
    assert (error.value.file, error.value.row, error.value.column) == (str(source), items[1]["index"], column)


def test_synthetic_mmmb_is_aligned_with_15_categories(tmp_path):
    pytest.importorskip("parrot.data.synthetic")
    build_main(["--synthetic", "30", "--seed", "7", "--out", str(tmp_path)])
    sets = read_mmmb([tmp_path])
    assert list(sets) == list(LANGUAGES)
    en = sets["en"]
    assert len({r.category for r in en}) == 15
    for lang, records in sets.items():
        assert [r.index for r in records] == [r.index for r in en]
        assert [r.answer for r in records] == [r.answer for r in en]
        assert [r.image_b64 for r in records] == [r.image_b64 for r in en]
        assert all(r.answer in OPTION_LETTERS[: len(r.options)] for r in records)
    assert len({r.question for lang in LANGUAGES for r in sets[lang][:1]}) == 6  # really translated
    again = tmp_path / "again"
    build_main(["--synthetic", "30", "--seed", "7", "--out", str(again)])
    assert read_tsv(again / "mmmb_ru.tsv") == sets["ru"]  # deterministic for a seed


def test_other_languages_in_a_source_are_left_out_and_aliases_are_not_doubled(tmp_path):
    """A source may carry more languages than MMMB's six: they are not read; 'zh' and 'cn' in one item is an
    error naming the item, not one silently overwriting the other."""
    source, items = _multilingual_source(tmp_path, n=3)
    for item in items:
        item["question"]["ja"], item["options"]["ja"] = "質問", ["あ", "い", "う"]
    source.write_text(json.dumps(items, ensure_ascii=False))
    sets = records_from_source(source, ["en", "zh"])
    assert set(sets) == {"en", "zh"} and all(len(records) == 3 for records in sets.values())
    items[1]["options"]["zh"] = items[1]["options"]["cn"]
    source.write_text(json.dumps(items, ensure_ascii=False))
    with pytest.raises(MMMBFormatError, match=r"two entries for language 'zh'"):
        records_from_source(source, ["en", "zh"])


def test_a_short_inline_base64_image_is_not_taken_for_a_file_name(tmp_path):
    """An inline base64 PNG under 4096 characters is first tried as a path; when its first path component is over
    255 characters the OS says "file name too long", which must not end the build."""
    import base64
    import io

    def inline_png(seed: int) -> str:
        buffer = io.BytesIO()
        noise = np.random.default_rng(seed).integers(0, 255, (14, 14, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    inline = next(text for text in map(inline_png, range(100)) if "/" not in text[:256])
    assert len(inline) < 4096
    source, items = _multilingual_source(tmp_path, n=1)
    items[0]["image"] = inline
    source.write_text(json.dumps(items, ensure_ascii=False))
    (record,) = records_from_source(source, ["en"])["en"]
    assert record.load_image().size == (14, 14)


def test_a_json_boolean_is_not_taken_for_an_index(tmp_path):
    """bool is an int in Python: "index": true would silently become item 1."""
    source, items = _multilingual_source(tmp_path, n=2)
    items[1]["index"] = True
    source.write_text(json.dumps(items, ensure_ascii=False))
    with pytest.raises(MMMBFormatError, match="expected int, got bool") as error:
        records_from_source(source)
    assert error.value.column == "index"
