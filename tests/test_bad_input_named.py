"""Bad input is refused with an error naming the file / line / field (or the flag), never substituted silently:
duplicate YAML keys, text that is not UTF-8, JSONL line numbers with U+2028 in strings, impossible leaderboard
accuracies, zero / negative counts on the command line, decompression bombs and extremely thin images."""
import base64
import io
import json
import math
import re
import struct
import zlib

import pytest
from PIL import Image

from parrot.data.images import (MAX_ASPECT_RATIO, BadImageError, ImageAspectRatioError, ImageTransform,
                                expand_to_square, load_image)
from parrot.fileio import YAMLFileError, load_yaml

MEAN = STD = (0.5, 0.5, 0.5)


def png_header_only(width, height):
    """A PNG whose IHDR claims width x height (1-bit grey) with one tiny zlib stream: opening it costs nothing, but
    Pillow refuses it as a decompression bomb above 2 * Image.MAX_IMAGE_PIXELS."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8))
            + chunk(b"IEND", b""))


def png_bytes(width, height, colour=(200, 10, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- YAML files
def test_load_yaml_refuses_a_duplicate_key_naming_file_line_and_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("seed: 1\nlr: 0.1\nseed: 2\n")
    with pytest.raises(YAMLFileError, match=re.escape(f"{path}:3: key 'seed' given twice") + r".*first at line 1"):
        load_yaml(path)
    path.write_text("outer:\n  a: 1\n  b: 2\n  a: 3\n")  # nested mappings too
    with pytest.raises(YAMLFileError, match=re.escape(f"{path}:4: key 'a'")):
        load_yaml(path)
    path.write_text("- {x: 1, x: 2}\n")  # flow mappings inside a list
    with pytest.raises(YAMLFileError, match=re.escape(f"{path}:1: key 'x'")):
        load_yaml(path)


def test_load_yaml_keeps_safe_load_semantics_otherwise(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  a: 5\n")  # a merge key may be overridden
    assert load_yaml(path) == {"base": {"a": 1, "b": 2}, "derived": {"a": 5, "b": 2}}
    path.write_text("")
    assert load_yaml(path) is None
    path.write_bytes("\ufeffname: Grüße\n".encode("utf-8"))
    assert load_yaml(path) == {"name": "Grüße"}
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "missing.yaml")


def test_load_yaml_names_the_file_and_line_of_bad_bytes_and_bad_yaml(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"a: 1\nname: Gr\xfc\xdfe\n")
    with pytest.raises(YAMLFileError, match=re.escape(f"{path}:2: not UTF-8 text (byte 0xfc at column 9)")):
        load_yaml(path)
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(YAMLFileError, match=re.escape(f"{path}:3:") + ".*invalid YAML"):
        load_yaml(path)
    assert issubclass(YAMLFileError, ValueError)


def test_training_config_refuses_a_duplicate_key(tmp_path):
    from parrot.train.config import load_yaml_defaults

    path = tmp_path / "cfg.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: key 'seed' given twice")):
        load_yaml_defaults(path)
    path.write_bytes(b"output_dir: runs/\xff\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: not UTF-8")):
        load_yaml_defaults(path)


def test_dataset_registry_refuses_a_dataset_named_twice(tmp_path):
    from parrot.data.datasets import DataFormatError, load_registry

    registry = tmp_path / "reg.yaml"
    registry.write_text("datasets:\n  a:\n    path: one.json\n  a:\n    path: two.json\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{registry}:4: key 'a' given twice")):
        load_registry(registry)
    registry.write_bytes(b"datasets:\n  a:\n    path: \xe9.json\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{registry}:3: not UTF-8")):
        load_registry(registry)


def test_model_recipe_refuses_a_duplicate_key(tmp_path):
    from parrot.model.builder import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("template: chatml\nparrot:\n  projector_type: linear\ntemplate: llama\n")
    with pytest.raises(ValueError, match=re.escape(f"{recipe}:4: key 'template' given twice")):
        load_recipe(recipe)


# ------------------------------------------------------------------------------ mmmb.build JSON / JSONL
def _item(index, question="What colour?"):
    return {"index": index, "image": base64.b64encode(png_bytes(4, 4)).decode(), "category": "colour",
            "answer": "A", "question": {"en": question}, "options": {"en": ["red", "blue"]}}


def test_mmmb_build_jsonl_line_numbers_count_newlines_only(tmp_path):
    from mmmb.build import records_from_source
    from mmmb.tsv import MMMBFormatError

    path = tmp_path / "items.jsonl"
    lines = [json.dumps(_item(i, f"first\u2028second\u2029third\x85 {i}?"), ensure_ascii=False) for i in range(3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sets = records_from_source(path, ["en"])  # valid JSONL: U+2028 / U+2029 / U+0085 inside strings are no line ends
    assert [r.question for r in sets["en"]] == [f"first\u2028second\u2029third\x85 {i}?" for i in range(3)]
    path.write_text("\n".join([*lines, "{not json"]) + "\n", encoding="utf-8")
    with pytest.raises(MMMBFormatError, match=re.escape(f"{path}: line 4: invalid JSON")):
        records_from_source(path, ["en"])


def test_mmmb_build_names_the_file_and_line_of_bytes_that_are_not_utf8(tmp_path):
    from mmmb.build import records_from_source
    from mmmb.tsv import MMMBFormatError

    path = tmp_path / "items.jsonl"
    path.write_bytes(json.dumps(_item(0)).encode() + b"\n" + json.dumps(_item(1)).encode()[:-5] + b"\xff\"}\n")
    with pytest.raises(MMMBFormatError, match=re.escape(f"{path}: line 2: not UTF-8 text (byte 0xff at column {len(json.dumps(_item(1))) - 4})")):
        records_from_source(path, ["en"])
    path = tmp_path / "items.json"
    path.write_bytes(b"\xef\xbb\xbf[\n" + json.dumps(_item(0)).encode() + b",\n\x93x\x94]")  # BOM, then cp1252 quotes
    with pytest.raises(MMMBFormatError, match=re.escape(f"{path}: line 3: not UTF-8 text (byte 0x93 at column 1)")):
        records_from_source(path, ["en"])
    path.write_text('[\n{"index": 0,\n"image": }]', encoding="utf-8")
    with pytest.raises(MMMBFormatError, match=re.escape(f"{path}: line 3: invalid JSON")):
        records_from_source(path, ["en"])


@pytest.mark.parametrize("argv, flag, message", [
    (["--synthetic", "0"], "--synthetic", "must be >= 1, got 0"),
    (["--synthetic", "-3"], "--synthetic", "must be >= 1, got -3"),
    (["--synthetic", "2", "--seed", "-1"], "--seed", "must be >= 0, got -1"),
    (["--synthetic", "two"], "--synthetic", "expected a whole number >= 1, got 'two'"),
])
def test_mmmb_build_refuses_zero_and_negative_counts_naming_the_flag(tmp_path, capsys, argv, flag, message):
    from mmmb.build import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- parrot.data.synthetic
@pytest.mark.parametrize("argv, flag, message", [
    (["--max-turns", "0"], "--max-turns", "must be >= 1, got 0"),
    (["--image-size", "0"], "--image-size", "must be >= 1, got 0"),
    (["--n-caption", "-1"], "--n-caption", "must be >= 0, got -1"),
    (["--n-qa", "-2"], "--n-qa", "must be >= 0, got -2"),
    (["--seed", "-1"], "--seed", "must be >= 0, got -1"),
])
def test_synthetic_cli_refuses_zero_and_negative_counts_naming_the_flag(tmp_path, capsys, argv, flag, message):
    from parrot.data.synthetic import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--n-caption", "2", "--n-qa", "2", *argv])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, name", [({"max_turns": 0}, "max_turns"), ({"image_size": 0}, "image_size"),
                                          ({"n": -1}, "n"), ({"seed": -1}, "seed")])
def test_make_conversation_records_refuses_bad_counts_by_name(kwargs, name):
    from parrot.data.synthetic import make_conversation_records

    arguments = {"n": 2, "seed": 0, "stage": "qa"} | kwargs
    with pytest.raises(ValueError, match=rf"^{name} must be a whole number >= \d, got -?\d"):
        make_conversation_records(**arguments)


# ------------------------------------------------------------------------------------ mmmb.cache
def test_prediction_cache_names_the_line_of_bytes_that_are_not_utf8(tmp_path):
    from mmmb.cache import PredictionCache

    path = tmp_path / "en.jsonl"
    good = json.dumps({"key": "0:0", "prediction": "A\u2028B"}, ensure_ascii=False).encode()
    path.write_bytes(good + b"\n" + good.replace(b"0:0", b"1:0") + b"\n" + b'{"key": "2:0", "x": "\xff"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: corrupt cache entry")):
        PredictionCache(path)
    path.write_bytes(good + b"\n" + good.replace(b"0:0", b"1:0") + b"\n")  # U+2028 in a string: still two lines
    assert sorted(PredictionCache(path).entries) == ["0:0", "1:0"]
    path.write_bytes(good + b"\n" + b'{"key": 7}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: corrupt cache entry (key 7 is not text)")):
        PredictionCache(path)


# ------------------------------------------------------------------------------------ mmmb.leaderboard
def _summary(folder, accuracy, **fields):
    folder.mkdir(parents=True)
    summary = {"model_name": folder.name, "mode": "generate", "accuracy": accuracy} | fields
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder / "summary.json"


SIX = dict.fromkeys(("en", "zh", "pt", "ar", "tr", "ru"), 50.0)


@pytest.mark.parametrize("accuracy, shown", [
    (SIX | {"zh": 250}, "250"), (SIX | {"zh": -3.5}, "-3.5"), (SIX | {"zh": math.nan}, "nan"),
    (SIX | {"zh": math.inf}, "inf"), (SIX | {"zh": "50"}, "'50'"), (SIX | {"zh": True}, "True"),
    (SIX | {"zh": None}, "None"),
])
def test_leaderboard_refuses_impossible_accuracies_naming_file_and_field(tmp_path, accuracy, shown):
    from mmmb.leaderboard import leaderboard

    _summary(tmp_path / "good", SIX)
    bad = _summary(tmp_path / "bad", accuracy)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: field 'accuracy' of language 'zh' is {shown}, not a "
                                                   "percentage in [0, 100]")):
        leaderboard([tmp_path])


def test_leaderboard_keeps_the_percentage_bounds_and_missing_languages(tmp_path):
    from mmmb.leaderboard import leaderboard

    _summary(tmp_path / "edges", SIX | {"en": 0, "zh": 100})
    _summary(tmp_path / "partial", {"en": 99.0})  # not evaluated on five languages: listed, no Avg
    table = leaderboard([tmp_path])
    assert list(table["model"]) == ["edges", "partial"] and math.isnan(table["Avg"][1])


@pytest.mark.parametrize("content, message", [
    ('["a list"]', "not an mmmb.evaluate summary (a JSON list, not an object)"),
    ('{"model_name": "m", "mode": "generate"}', "not an mmmb.evaluate summary (no field 'accuracy')"),
    ('{"model_name": 7, "mode": "generate", "accuracy": {}}', "field 'model_name' must be non-empty text, got 7"),
    ('{"model_name": "m", "mode": ["g"], "accuracy": {}}', "field 'mode' must be non-empty text"),
    ('{"model_name": "m", "mode": "g", "accuracy": [50]}', "field 'accuracy' must be a mapping"),
    ('{"model_name": "m", "mode": "g", "accuracy": {"en": 5}, "items": {"en": "many"}}',
     "field 'items': malformed item counts (item count 'many' is not a whole number >= 0)"),
    ('{"model_name": "m", "mode": "g", "accuracy": {"en": 5}, "items": {"en": 12.5}}', "item count 12.5"),
    ('{"model_name": "m", "mode": "g", "accuracy": {"en": 5}, "items": [1]}', "field 'items': malformed"),
    ('{"model_name": "m", "mode": "g", "accuracy": {"en": 5}, "data_identity": {"en": {"items": 3, "digest": null}}}',
     "malformed data_identity"),
    ('{"model_name": "m",\n "mode": }', "invalid JSON at line 2"),
])
def test_leaderboard_refuses_malformed_summaries_naming_the_file(tmp_path, content, message):
    from mmmb.leaderboard import leaderboard

    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "summary.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        leaderboard([tmp_path])
    path.write_bytes(b'{"model_name": "M\xfcller"}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not an mmmb.evaluate summary (not UTF-8")):
        leaderboard([tmp_path])


# ------------------------------------------------------------------------------------- mmmb.tsv images
def _tsv(path, image=None, image_path=None):
    cell = ("image", image) if image is not None else ("image_path", image_path)
    path.write_text(f"index\tquestion\tA\tB\tanswer\tcategory\t{cell[0]}\n0\tq?\tx\ty\tA\tc\t{cell[1]}\n")
    return path


def test_tsv_decompression_bomb_and_thin_images_name_file_row_and_column(tmp_path):
    from mmmb.tsv import MMMBFormatError, read_tsv

    bomb = base64.b64encode(png_header_only(20000, 20000)).decode()
    path = _tsv(tmp_path / "mmmb_en.tsv", image=bomb)
    with pytest.raises(MMMBFormatError, match="DecompressionBombError") as error:
        read_tsv(path)
    assert (error.value.file, error.value.column) == (str(path), "image") and str(path) in str(error.value)

    (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))
    path = _tsv(tmp_path / "mmmb_zh.tsv", image_path="bomb.png")
    with pytest.raises(MMMBFormatError, match="bomb.png.*DecompressionBombError") as error:
        read_tsv(path)
    assert (error.value.file, error.value.column) == (str(path), "image_path")

    thin = base64.b64encode(png_bytes(2, 2 * MAX_ASPECT_RATIO + 1)).decode()
    path = _tsv(tmp_path / "mmmb_pt.tsv", image=thin)
    with pytest.raises(MMMBFormatError, match="image too thin") as error:
        read_tsv(path)
    assert (error.value.file, error.value.column) == (str(path), "image")


def test_mcq_record_load_image_names_the_file(tmp_path):
    from mmmb.tsv import read_tsv

    (tmp_path / "pic.png").write_bytes(png_bytes(5, 5))
    (record,) = read_tsv(_tsv(tmp_path / "mmmb_tr.tsv", image_path="pic.png"))
    (tmp_path / "pic.png").write_bytes(png_header_only(20000, 20000))  # replaced after the check
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "pic.png")) + ".*DecompressionBombError"):
        record.load_image()
    (tmp_path / "pic.png").unlink()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "pic.png")) + ": image file not found"):
        record.load_image()


# ----------------------------------------------------------------------------- parrot.data.images aspect
def test_load_image_refuses_an_extremely_thin_image_naming_the_file(tmp_path):
    thin = tmp_path / "thin.png"
    thin.write_bytes(png_bytes(1, 12000))
    with pytest.raises(ImageAspectRatioError, match=re.escape(f"{thin}: image too thin (1x12000 pixels, 12000:1")):
        load_image(thin)
    with pytest.raises(ImageAspectRatioError, match="upload.png: image too thin"):
        load_image(Image.new("RGB", (12000, 1)), name="upload.png")
    assert issubclass(ImageAspectRatioError, BadImageError)
    edge = tmp_path / "edge.png"
    edge.write_bytes(png_bytes(2 * MAX_ASPECT_RATIO, 2))  # exactly at the limit: kept
    assert load_image(edge).size == (2 * MAX_ASPECT_RATIO, 2)


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_transform_refuses_an_extremely_thin_image_before_allocating(mode):
    with pytest.raises(ImageAspectRatioError, match=r"1x12000 pixels"):
        ImageTransform(8, MEAN, STD, mode)(Image.new("RGB", (1, 12000)))
    with pytest.raises(ImageAspectRatioError):
        expand_to_square(Image.new("RGB", (12000, 1)), (0, 0, 0))
    assert ImageTransform(8, MEAN, STD, mode)(Image.new("RGB", (MAX_ASPECT_RATIO, 1))).shape == (3, 8, 8)


def test_training_data_counts_a_thin_image_as_a_skip_or_names_it(tmp_path):
    import numpy as np
    import torch

    from parrot.data.datasets import ConversationDataset, mix_datasets
    from parrot.data.synthetic import make_conversation_records
    from parrot.data.tokenizer import build_tiny_tokenizer

    records = make_conversation_records(4, seed=0, stage="caption", image_dir=tmp_path / "images")
    (tmp_path / "cap.json").write_text(json.dumps(records, ensure_ascii=False))
    (tmp_path / "reg.yaml").write_text("datasets:\n  cap:\n    path: cap.json\n    image_dir: images\n")
    thin = tmp_path / "images" / records[1]["image"]
    thin.write_bytes(png_bytes(3, 3000))
    tokenizer = build_tiny_tokenizer(vocab_size=400, seed=0, n_texts=300)

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    mixed = mix_datasets("cap", tmp_path / "reg.yaml")
    with pytest.raises(BadImageError, match=re.escape(str(thin)) + ".*image too thin") as error:
        ConversationDataset(mixed, tokenizer, "chatml", 128, to_tensor, on_bad_image="error")
    assert records[1]["id"] in str(error.value)
    dataset = ConversationDataset(mixed, tokenizer, "chatml", 128, to_tensor, on_bad_image="skip")
    assert len(dataset) == 3 and dataset.report.counts == {"checked": 4, "skipped": 1, "too_thin_image": 1}
    assert dataset.report.to_dict()["skipped"][0]["file"] == str(thin)


def test_write_tsv_refuses_an_empty_item_list_naming_the_file(tmp_path):
    from mmmb.tsv import write_tsv

    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'mmmb_en.tsv'}: no items to write")):
        write_tsv(tmp_path / "mmmb_en.tsv", [])
    assert not (tmp_path / "mmmb_en.tsv").exists()


@pytest.mark.parametrize("module, argv, flag", [
    ("parrot.serve.demo", ["--concurrency", "0"], "--concurrency"),
    ("parrot.serve.demo", ["--max-queue", "-1"], "--max-queue"),
    ("parrot.convert.__main__", ["official", "--src", "x", "--dst", "y", "--model-max-length", "0"],
     "--model-max-length"),
    ("mmmb.evaluate", ["--batch-size", "0"], "--batch-size"),
    ("mmmb.evaluate", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("parrot.moe.methods.router_lens", ["--steps", "0"], "--steps"),
    ("parrot.moe.methods.router_lens", ["--threads", "-1"], "--threads"),
    ("parrot.model.builder", ["--seed", "-1"], "--seed"),
    ("benchmarks.bench_mole", ["--tokens", "0"], "--tokens"),
    ("benchmarks.bench_parrot_moe", ["--repeats", "0"], "--repeats"),
])
def test_command_counts_below_their_minimum_are_refused_naming_the_flag(module, argv, flag, capsys):
    """Counts, sizes and seeds of every command go through `positive_int` / `non_negative_int`: a bad value stops
    argparse (exit 2) naming the flag, before any model is built or file read."""
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be >=" in err, err
