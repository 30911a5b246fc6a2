"""VLMEvalKit TSV reading/writing: round trip, official file names, alignment, and located bad-input errors."""
import base64
import io
import re

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


_HEADER = "index\tquestion\tA\tB\tC\tanswer\tcategory\timage"


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _line(index, question="q", image=None):
    return f"{index}\t{question}\tx\ty\tz\tA\tc\t{image or _png_b64()}"


def test_quote_left_open_is_an_error_not_swallowed_rows(tmp_path):
    # pandas' lenient reader turned these 4 rows into 2, row 1's question holding rows 2 and 3
    path = _write_lines(tmp_path / "mmmb_en.tsv", [_HEADER, _line(1, '"Which one?'), _line(2), _line(3, 'says "hi"'),
                                                   _line(4)])
    with pytest.raises(MMMBFormatError, match="quote left open") as error:
        read_tsv(path)
    assert error.value.file == str(path) and error.value.row == "(line 2)"


def test_quote_left_open_in_last_cell_is_caught_by_the_swallowed_row_check(tmp_path):
    # The quote opens in the image cell of row 1 and closes at the end of row 2: the cell count stays right.
    image = _png_b64()
    path = _write_lines(tmp_path / "mmmb_en.tsv", [_HEADER, _line(1, image=f'"{image}'), _line(2, image=f'{image}"'),
                                                   _line(3)])
    with pytest.raises(MMMBFormatError, match="swallowed the rows") as error:
        read_tsv(path)
    assert error.value.row == "(data row 1, line 2)" and error.value.column == "image"


def test_stray_quotes_in_an_unquoted_cell_are_an_error_not_dropped(tmp_path):
    # pandas read this question as 'Big or small?' (quotes lost)
    path = _write_lines(tmp_path / "mmmb_en.tsv", [_HEADER, _line(1), _line(2, '"Big" or small?')])
    with pytest.raises(MMMBFormatError, match="malformed TSV at line 3") as error:
        read_tsv(path)
    assert error.value.row == "(line 3)"


def test_quotes_tabs_and_newlines_round_trip_and_read_the_same_in_pandas(tmp_path, toy):
    records = list(toy["en"])
    records[0] = records[0].__class__(**{**records[0].__dict__, "question": '"Big" or small?\nsay "hi"\t(2 lines)',
                                         "options": ('"x"', "a\tb") + records[0].options[2:]})
    path = write_tsv(tmp_path / "mmmb_en.tsv", records)
    assert read_tsv(path) == records
    # VLMEvalKit reads the same file with pandas' default quoting
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert len(table) == len(records) and table.loc[0, "question"] == records[0].question
    assert list(table.loc[0, ["A", "B"]]) == ['"x"', "a\tb"]


def test_text_that_would_read_as_a_swallowed_row_is_refused_by_the_writer(tmp_path, toy):
    bad = toy["en"][0].__class__(**{**toy["en"][0].__dict__, "question": "Table:\n12\tapples"})
    with pytest.raises(ValueError, match=r"item \d+, column 'question'"):
        write_tsv(tmp_path / "mmmb_en.tsv", [bad])


@pytest.mark.parametrize(("lines", "row", "column", "message"), [
    ([_HEADER], None, None, "no data rows"),
    ([], None, None, "empty file"),
    ([_HEADER, "1\tq\tx\ty"], "(data row 1, line 2)", None, "4 cells but the header has 8"),
    ([_HEADER.replace("\tC\t", "\tB\t")], None, "B", "column name used twice"),
])
def test_structural_errors_name_the_file(tmp_path, lines, row, column, message):
    path = tmp_path / "mmmb_en.tsv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    with pytest.raises(MMMBFormatError, match=message) as error:
        read_tsv(path)
    assert error.value.file == str(path) and error.value.row == row and error.value.column == column


@pytest.mark.parametrize("text", ["None", "NA", "nan", "NULL", "N/A"])
def test_writer_refuses_text_that_vlmevalkit_reads_as_an_empty_cell(tmp_path, toy, text):
    """VLMEvalKit loads TSVs with pandas' default NA parsing, which turns these texts into NaN and drops the option."""
    probe = tmp_path / "probe.tsv"
    probe.write_text(f"A\tB\n{text}\tx\n", encoding="utf-8")
    assert pd.isna(pd.read_csv(probe, sep="\t").loc[0, "A"])  # the reason for the check, as pandas behaves here
    records = list(toy["en"])
    records[2] = records[2].__class__(**{**records[2].__dict__, "options": (records[2].options[0], text,
                                                                              *records[2].options[2:])})
    with pytest.raises(ValueError, match=rf"item {records[2].index}, column 'B': the text '{re.escape(text)}'"):
        write_tsv(tmp_path / "mmmb_en.tsv", records)
    # a spelling pandas keeps as text is fine
    records[2] = records[2].__class__(**{**records[2].__dict__, "options": ("none", "x", *records[2].options[2:])})
    assert read_tsv(write_tsv(tmp_path / "mmmb_en.tsv", records))[2].options[0] == "none"


@pytest.mark.parametrize("raw", ["+1", "1_000", "١", "٣"])
def test_index_must_be_written_with_ascii_digits(tmp_path, raw):
    """int() accepts these spellings and would silently give the row the index of another spelling."""
    path = _write_lines(tmp_path / "mmmb_en.tsv", [_HEADER, _line(raw)])
    with pytest.raises(MMMBFormatError, match="is not an integer") as error:
        read_tsv(path)
    assert error.value.column == "index" and error.value.row == "(data row 1)"
