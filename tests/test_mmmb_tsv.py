"""VLMEvalKit TSV reading/writing: round trip, official file names, alignment, and located bad-input errors."""
import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmmb.toy import toy_mmmb
from mmmb.tsv import MMMBFormatError, find_language_files, read_mmmb, read_tsv, write_tsv


@pytest.fixture()
def toy():
    return toy_mmmb(n_items=6, seed=3, languages=("en", "zh", "ar"))


def _write_raw(path, rows):
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _png_b64(colour=(10, 20, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _row(index=0, answer="A", image=None, **extra):
    row = {"index": index, "question": "q?", "A": "x", "B": "y", "C": "z", "answer": answer, "category": "cat",
           "image": image if image is not None else _png_b64()}
    return row | extra


def test_round_trip_preserves_records_and_pixels(tmp_path, toy):
    path = write_tsv(tmp_path / "mmmb_en.tsv", toy["en"])
    header = path.read_text().splitlines()[0].split("\t")
    assert header == ["index", "question", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    back = read_tsv(path)
    assert back == toy["en"]
    for original, read in zip(toy["en"], back):
        assert np.array_equal(np.asarray(original.load_image()), np.asarray(read.load_image()))
    # items with 3 options leave column D empty and read back with 3 options
    assert {len(r.options) for r in back} == {3, 4}


def test_official_cn_name_and_both_spellings_rejected_together(tmp_path, toy):
    write_tsv(tmp_path / "mmmb_en.tsv", toy["en"])
    write_tsv(tmp_path / "mmmb_cn.tsv", toy["zh"])
    sets = read_mmmb([tmp_path])
    assert list(sets) == ["en", "zh"] and sets["zh"] == toy["zh"]
    write_tsv(tmp_path / "mmmb_zh.tsv", toy["zh"])
    with pytest.raises(MMMBFormatError, match="second file for language 'zh'"):
        find_language_files([tmp_path])


def test_misaligned_languages_are_rejected(tmp_path, toy):
    write_tsv(tmp_path / "mmmb_en.tsv", toy["en"])
    write_tsv(tmp_path / "mmmb_ar.tsv", toy["ar"][:-1])
    with pytest.raises(MMMBFormatError) as error:
        read_mmmb([tmp_path])
    assert error.value.file.endswith("mmmb_ar.tsv") and error.value.column == "index"
    assert error.value.row == toy["en"][-1].index

    shifted = [r.__class__(**{**r.__dict__, "answer": "B" if r.answer != "B" else "A"}) if i == 2 else r
               for i, r in enumerate(toy["ar"])]
    write_tsv(tmp_path / "mmmb_ar.tsv", shifted)
    with pytest.raises(MMMBFormatError) as error:
        read_mmmb([tmp_path])
    assert error.value.column == "answer" and error.value.row == toy["ar"][2].index


def test_image_reference_to_another_row_is_resolved(tmp_path):
    path = _write_raw(tmp_path / "mmmb_en.tsv", [_row(0), _row(1, image="0")])
    first, second = read_tsv(path)
    assert second.image_b64 == first.image_b64


def test_image_path_column_relative_to_tsv(tmp_path):
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp_path / "pic.png")
    row = _row(0) | {"image_path": "pic.png"}
    del row["image"]
    (record,) = read_tsv(_write_raw(tmp_path / "mmmb_tr.tsv", [row]))
    assert record.load_image().getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(("rows", "row", "column", "message"), [
    ([{k: v for k, v in _row().items() if k != "answer"}], None, "answer", "missing required column"),
    ([{k: v for k, v in _row().items() if k != "category"}], None, "category", "missing required column"),
    ([_row(0), _row(1, answer="D")], "1 (data row 2)", "answer", "not among the options"),
    ([_row(0), _row(7, image="bm90IGFuIGltYWdl")], "7 (data row 2)", "image", "not a decodable image"),
    ([_row(0), _row(5, image="%%%notbase64%%%")], "5 (data row 2)", "image", "not valid base64"),
    ([_row(4), _row(4)], "4 (data row 2)", "index", "duplicate index"),
    ([_row("x")], "(data row 1)", "index", "not an integer"),
    ([_row(2, B="")], "2 (data row 1)", "B", "empty option"),
    ([_row(3, image="9")], "3 (data row 1)", "image", "refers to index 9"),
])
def test_bad_input_errors_name_file_row_and_column(tmp_path, rows, row, column, message):
    path = _write_raw(tmp_path / "mmmb_pt.tsv", rows)
    with pytest.raises(MMMBFormatError, match=message) as error:
        read_tsv(path)
    assert error.value.file == str(path) and error.value.row == row and error.value.column == column
    assert str(path) in str(error.value) and repr(column) in str(error.value)
