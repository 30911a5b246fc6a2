import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parrot.data.datasets import (
    DEFAULT_REGISTRY,
    BadDataReport,
    ConversationDataset,
    DataCollator,
    DataConfig,
    DataFormatError,
    PackedRecords,
    SourcedRecord,
    build_dataset,
    load_records,
    load_registry,
    mix_datasets,
    parse_spec,
    sample_records,
)
from parrot.data.images import BadImageError, ImageTransform
from parrot.data.synthetic import make_conversation_records
from parrot.data.templates import IGNORE_INDEX, get_template, llava_to_messages
from parrot.data.tokenizer import build_tiny_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(vocab_size=1000, seed=0, n_texts=1500)


def write_registry(tmp_path, datasets: dict) -> Path:
    lines = ["datasets:"]
    for name, spec in datasets.items():
        lines.append(f"  {name}:")
        lines.extend(f"    {k}: {v}" for k, v in spec.items())
    path = tmp_path / "registry.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def synthetic_sets(tmp_path):
    """Two small synthetic datasets (caption as JSON, qa as JSONL) plus a registry naming them."""
    images = tmp_path / "images"
    caption = make_conversation_records(10, seed=0, stage="caption", image_dir=images)
    qa = make_conversation_records(6, seed=0, stage="qa", image_dir=images)
    (tmp_path / "caption.json").write_text(json.dumps(caption, ensure_ascii=False))
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in qa) + "\n")
    registry = write_registry(tmp_path, {
        "cap": {"path": "caption.json", "image_dir": "images", "ratio": 1.0},
        "qa": {"path": "qa.jsonl", "image_dir": "images"},
    })
    return registry, caption, qa


# ----------------------------------------------------------------------------------------- loading
def test_load_json_and_jsonl(synthetic_sets, tmp_path):
    _, caption, qa = synthetic_sets
    assert load_records(tmp_path / "caption.json") == caption
    assert load_records(tmp_path / "qa.jsonl") == qa


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{{\"id\": \"b\", \"conversations\": [}}\n{good}\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: invalid JSON"):
        load_records(path)


def test_bad_json_list_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"id": "a",\n  "conversations": []\n  "image": "x.png"}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad\.json:4: invalid JSON"):
        load_records(path)


@pytest.mark.parametrize("record, field", [
    ({"id": "x"}, "'conversations'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "'id'"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "'conversations\\[0\\].value'"),
])
def test_missing_field_names_file_record_and_field(tmp_path, record, field):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(DataFormatError, match=rf"data\.json: record 1.*missing required field {field}"):
        load_records(path)


def test_placeholder_count_must_match_image(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "x", "image": "a.png",
                                 "conversations": [{"from": "human", "value": "no placeholder"},
                                                   {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(DataFormatError, match="record 0 \\(id 'x'\\): 0 '<image>' placeholders"):
        load_records(path)


def test_conversation_without_assistant_turn_is_rejected(tmp_path):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, {"id": "q-only", "conversations": [
        {"from": "system", "value": "be brief"}, {"from": "human", "value": "What colour is it?"}]}]) + "\n")
    with pytest.raises(DataFormatError, match=r"data\.jsonl: record 1 \(id 'q-only'\): .*no assistant turn"):
        load_records(path)


# ---------------------------------------------------------------------------------- registry + mixing
def test_parse_spec():
    assert parse_spec("a:0.5|b") == [("a", 0.5), ("b", None)]
    assert parse_spec("synthetic-caption|synthetic-qa:2") == [("synthetic-caption", None), ("synthetic-qa", 2.0)]
    with pytest.raises(ValueError, match="not a number"):
        parse_spec("a:x")
    with pytest.raises(ValueError, match="empty dataset name"):
        parse_spec("a||b")


def test_mix_ratios_and_determinism(synthetic_sets):
    registry, caption, qa = synthetic_sets
    mixed = mix_datasets("cap:0.5|qa", registry)
    assert [m.dataset for m in mixed] == ["cap"] * 5 + ["qa"] * 6
    assert len({m.record["id"] for m in mixed[:5]}) == 5  # without replacement
    assert [m.record["id"] for m in mixed] == [m.record["id"] for m in mix_datasets("cap:0.5|qa", registry)]
    upsampled = mix_datasets("qa:2.5", registry)
    ids = [m.record["id"] for m in upsampled]
    assert len(ids) == 15  # 2 full copies + round(0.5 * 6)
    counts = {i: ids.count(i) for i in set(ids)}
    assert sorted(counts.values()) == [2, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="'nope' is not in .*known: \\['cap', 'qa'\\]"):
        mix_datasets("nope", registry)


def test_a_ratio_keeps_round_ratio_times_n_records():
    """The documented count, round(r * N), also where the whole and fractional parts would round apart
    (N=5, r=1.3: 6.5 -> 6; N=1, r=1.5 -> 2), with whole copies and no record more than once beyond them."""
    from parrot.data.datasets import _sample_indices

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 7, 40):
        for ratio in (0.1, 0.3, 0.5, 1.0, 1.3, 1.5, 2.5, 3.7):
            picked = _sample_indices(n, ratio, rng)
            assert len(picked) == round(ratio * n), (n, ratio)
            counts = np.bincount(picked, minlength=n)
            assert counts.max() - counts.min() <= 1 and set(picked.tolist()) <= set(range(n))


def test_registry_ratio_is_the_default(tmp_path, synthetic_sets):
    _, caption, _ = synthetic_sets
    registry = write_registry(tmp_path, {"cap": {"path": "caption.json", "image_dir": "images", "ratio": 0.3}})
    assert len(mix_datasets("cap", registry)) == 3
    assert len(mix_datasets("cap:1", registry)) == 10


def test_project_registry_parses():
    entries = load_registry(DEFAULT_REGISTRY)
    assert {"synthetic-caption", "synthetic-qa"} <= set(entries)
    root = DEFAULT_REGISTRY.parent.parent
    assert entries["synthetic-qa"].path == root / "data/synthetic/qa.json"
    assert entries["synthetic-qa"].image_dir == root / "data/synthetic/images"


# --------------------------------------------------------------------------------- dataset + collate
def test_dataset_items_and_collate(synthetic_sets, tmp_path, tokenizer):
    registry, _, _ = synthetic_sets
    text_only = SourcedRecord({"id": "t0", "conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "gpt", "value": "Hello"}]},
                              "inline", 0, None, "inline")
    records = mix_datasets("cap|qa", registry)[:3] + [text_only] + mix_datasets("qa", registry)[:1]
    dataset = ConversationDataset(records, tokenizer, "chatml", max_length=256, image_transform=to_tensor)
    items = [dataset[i] for i in range(len(dataset))]
    for record, item in zip(records, items):
        assert item["input_ids"].shape == item["labels"].shape
        answer = record.record["conversations"][-1]["value"]
        labelled = item["input_ids"][item["labels"] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == f"{answer}<|im_end|>"
    assert items[3]["pixel_values"] is None

    batch = DataCollator(tokenizer.pad_token_id)(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (5, max(lengths))
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    # one image per image record, in placeholder (batch) order; the text-only record adds none
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == batch["pixel_values"].shape[0] == 4
    image_rows = [r for r in records if "image" in r.record]
    for k, record in enumerate(image_rows):
        expected = to_tensor(Image.open(record.image_path).convert("RGB"))
        assert torch.equal(batch["pixel_values"][k], expected)
    assert "pixel_values" not in DataCollator(tokenizer.pad_token_id)([items[3]])


def test_with_clip_image_transform(synthetic_sets, tokenizer):
    registry, _, _ = synthetic_sets
    transform = ImageTransform(32, CLIP_MEAN, CLIP_STD, "pad")
    dataset = build_dataset(DataConfig(spec="qa", registry=str(registry), max_length=128), tokenizer, transform)
    batch = DataCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def _break_images(records):
    """Delete the first image record's file and corrupt the second's; return their paths."""
    with_images = [r for r in records if r.image_path is not None]
    missing, corrupt = with_images[0].image_path, with_images[1].image_path
    missing.unlink()
    corrupt.write_bytes(b"not a png at all")
    return with_images[0], with_images[1]


def test_bad_image_error_policy(synthetic_sets, tokenizer):
    registry, _, _ = synthetic_sets
    records = mix_datasets("cap", registry)
    first, _ = _break_images(records)
    with pytest.raises(BadImageError) as err:
        ConversationDataset(records, tokenizer, "chatml", 128, to_tensor, on_bad_image="error")
    message = str(err.value)
    assert "caption.json: record 0" in message and first.record["id"] in message
    assert str(first.image_path) in message and "not found" in message


def test_bad_image_skip_policy_counts_and_reports(synthetic_sets, tokenizer, tmp_path):
    registry, _, _ = synthetic_sets
    records = mix_datasets("cap", registry)
    missing, corrupt = _break_images(records)
    dataset = ConversationDataset(records, tokenizer, "chatml", 128, to_tensor, on_bad_image="skip")
    assert len(dataset) == len(records) - 2
    assert {r.record["id"] for r in dataset.records}.isdisjoint({missing.record["id"], corrupt.record["id"]})
    assert dataset.report.counts == {"checked": 10, "skipped": 2, "missing": 1, "unreadable": 1}
    out = tmp_path / "report" / "bad.json"
    dataset.report.write(out)
    written = json.loads(out.read_text())
    assert written["counts"]["skipped"] == 2
    assert [(e["file"], e["id"]) for e in written["skipped"]] == [
        (str(missing.image_path), missing.record["id"]), (str(corrupt.image_path), corrupt.record["id"])]


def test_build_dataset_writes_report(synthetic_sets, tokenizer, tmp_path):
    registry, _, _ = synthetic_sets
    _break_images(mix_datasets("qa", registry))
    report = tmp_path / "bad_data.json"
    config = DataConfig(spec="qa", registry=str(registry), max_length=128, on_bad_image="skip",
                        bad_data_report=str(report))
    dataset = build_dataset(config, tokenizer, to_tensor)
    assert len(dataset) == 4
    assert json.loads(report.read_text())["counts"] == {"checked": 6, "skipped": 2, "missing": 1, "unreadable": 1}


def test_bad_policy_name(tokenizer):
    with pytest.raises(ValueError, match="on_bad_image"):
        ConversationDataset([], tokenizer, "chatml", 16, to_tensor, on_bad_image="ignore")


def test_report_counts_by_kind():
    report = BadDataReport()
    report.add("a.png", "r1", "a.png: image file not found", "missing")
    report.add("b.png", "r2", "b.png: cannot decode image", "unreadable")
    report.add("c.png", "r3", "c.png: image file not found", "missing")
    assert report.counts == {"checked": 0, "skipped": 3, "missing": 2, "unreadable": 1}
    assert [e["kind"] for e in report.to_dict()["skipped"]] == ["missing", "unreadable", "missing"]


def test_record_with_no_label_left_after_truncation_is_a_counted_skip(tokenizer, tmp_path):
    def text_record(index, question):
        record = {"id": f"r{index}", "conversations": [{"from": "human", "value": question},
                                                       {"from": "gpt", "value": "Blue."}]}
        return SourcedRecord(record, "train.json", index, None, "qa")

    max_length = 64
    long_question = "What colour is it? " * 40  # alone far past max_length: the answer is cut off entirely
    records = [text_record(0, "What colour is it?"), text_record(1, long_question), text_record(2, "And this?")]
    dataset = ConversationDataset(records, tokenizer, "chatml", max_length)
    assert [r.record["id"] for r in dataset.records] == ["r0", "r2"]
    assert dataset.report.counts == {"checked": 0, "skipped": 1, "no_supervised_tokens": 1}
    (entry,) = dataset.report.to_dict()["skipped"]
    assert entry["file"] == "train.json" and entry["id"] == "r1" and "record 1" in entry["reason"]
    for item in (dataset[0], dataset[1]):  # what is kept still has its answer to learn
        labelled = item["input_ids"][item["labels"] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == "Blue.<|im_end|>"


def test_record_whose_text_spells_a_control_token_is_a_counted_skip(tokenizer):
    """A literal "<|im_end|>" in an answer would be tokenised as the end-of-turn token (the model would learn to end
    its turn mid-answer): the record is skipped and counted, naming the turn. Reference: the token ids of the text."""
    def text_record(index, question, answer):
        record = {"id": f"r{index}", "conversations": [{"from": "human", "value": question},
                                                       {"from": "gpt", "value": answer}]}
        return SourcedRecord(record, "train.json", index, None, "qa")

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    injected = "Blue.<|im_end|> and more"
    assert im_end in tokenizer(injected, add_special_tokens=False)["input_ids"]  # why it must not be trained on
    records = [text_record(0, "What colour?", "Blue."), text_record(1, "What colour?", injected),
               text_record(2, "Say <|im_start|>system", "No."), text_record(3, "A <b> tag?", "Yes, <b>.")]
    dataset = ConversationDataset(records, tokenizer, "chatml", 64)
    assert [r.record["id"] for r in dataset.records] == ["r0", "r3"]
    assert dataset.report.counts == {"checked": 0, "skipped": 2, "control_token_text": 2}
    reasons = [e["reason"] for e in dataset.report.to_dict()["skipped"]]
    assert "conversations[1] contains '<|im_end|>'" in reasons[0] and "record 1" in reasons[0]
    assert "conversations[0] contains '<|im_start|>'" in reasons[1]
    for item in (dataset[0], dataset[1]):  # what is kept: one end-of-turn per turn (system, user, assistant)
        assert item["input_ids"].tolist().count(im_end) == 3


# ------------------------------------------------------------------------------------ review additions
def _qa(record_id, user="<image>\nWhat colour?", answer="Red.", image="a.png"):
    record = {"id": record_id, "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


def test_non_utf8_data_file_is_an_error_naming_file_and_line(tmp_path):
    records = [_qa("a"), _qa("b", answer="Café.")]
    as_json = tmp_path / "latin1.json"
    as_json.write_bytes(json.dumps(records, ensure_ascii=False, indent=1).encode("latin-1"))
    bad_line = json.dumps(records, ensure_ascii=False, indent=1).splitlines().index(
        next(line for line in json.dumps(records, ensure_ascii=False, indent=1).splitlines() if "Café" in line)) + 1
    with pytest.raises(DataFormatError, match=rf"latin1\.json:{bad_line}: not UTF-8"):
        load_records(as_json)
    as_jsonl = tmp_path / "latin1.jsonl"
    as_jsonl.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_records(as_jsonl)


def test_non_utf8_byte_after_a_byte_order_mark_is_named_exactly(tmp_path):
    # utf-8-sig counts the error's offset after the BOM: the byte and column must be the bad byte's own
    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf[\n{"a": "b\xff"}]')
    with pytest.raises(DataFormatError, match=r"bom\.json:2: not UTF-8 text \(byte 0xff at column 9\)"):
        load_records(path)


def test_utf8_with_byte_order_mark_loads(tmp_path):
    records = [_qa("a"), _qa("b")]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, records)).encode() + b"\n")
    assert load_records(tmp_path / "bom.json") == records == load_records(tmp_path / "bom.jsonl")


def test_jsonl_lines_end_only_at_newline(tmp_path):
    """`json.dumps(..., ensure_ascii=False)` writes U+2028, U+2029 and U+0085 (NEL, what cp1252's ellipsis becomes
    when read as Latin-1) raw inside strings; `str.splitlines` broke such a record in two ("invalid JSON")."""
    records = [_qa("a", user="<image>\nFirst line\u2028second\u2029third"), _qa("b", answer="Wait\u0085 red."),
               _qa("c", image=None, user="Plain")]
    path = tmp_path / "data.JSONL"  # the suffix in any case
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # really raw in the file
    assert load_records(path) == records


@pytest.mark.parametrize("record, message", [
    (_qa("x", user="What colour?", answer="<image> Red."),
     r"field 'conversations\[1\]\.value': '<image>' placeholder in an assistant"),
    (_qa("x", image=""), r"field 'image' must be a non-empty string"),
    (_qa("x", answer=None), r"field 'conversations\[1\]\.value' must be a string, got NoneType"),
    ({"id": "x", "conversations": [{"from": "bot", "value": "hi"}, {"from": "gpt", "value": "a"}]},
     r"field 'conversations\[0\]\.from' is 'bot'"),
])
def test_malformed_turns_name_the_record_and_field(tmp_path, record, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_qa("ok"), record]))
    with pytest.raises(DataFormatError, match=r"data\.json: record 1 \(id 'x'\): " + message):
        load_records(path)


@pytest.mark.parametrize("spec, message", [
    ("a:nan", "finite number > 0"), ("a:inf", "finite number > 0"), ("a:-1", "finite number > 0"),
    ("a:", "not a number"), ("a|b|a:2", "'a' is named twice"),
])
def test_bad_spec_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


@pytest.mark.parametrize("entry, message", [
    ({"path": "caption.json", "ratio": "abc"}, r"dataset 'cap': field 'ratio': ratio 'abc' is not a number"),
    ({"path": "caption.json", "ratio": ".nan"}, r"dataset 'cap': field 'ratio': .*finite number > 0"),
    ({"path": "caption.json", "ratio": ".inf"}, r"dataset 'cap': field 'ratio': .*finite number > 0"),
    ({"path": 5}, r"dataset 'cap': field 'path' must be a path string"),
    ({"path": "null"}, r"dataset 'cap': field 'path' must be a path string"),
    ({"path": "caption.json", "image_dir": "[a, b]"}, r"dataset 'cap': field 'image_dir' must be a path string"),
])
def test_bad_registry_entry_names_the_field(tmp_path, entry, message):
    registry = write_registry(tmp_path, {"cap": entry})
    with pytest.raises(DataFormatError, match=rf"registry\.yaml: {message}"):
        load_registry(registry)


def test_a_dataset_the_mix_would_leave_out_is_an_error(synthetic_sets, tmp_path):
    registry, _, _ = synthetic_sets
    assert len(mix_datasets("cap:0.06|qa", registry)) == round(0.06 * 10) + 6 == 7  # still one caption record
    with pytest.raises(ValueError, match=r"dataset 'cap' .*ratio 0.01 of its 10 records keeps none"):
        mix_datasets("cap:0.01|qa", registry)
    (tmp_path / "qa.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"dataset 'qa' .*of its 0 records keeps none"):
        mix_datasets("cap|qa", registry)


def test_text_is_checked_before_images_and_each_image_is_decoded_once(synthetic_sets, tokenizer, monkeypatch):
    import parrot.data.datasets as datasets_module

    registry, _, _ = synthetic_sets
    decoded = []
    real_load = datasets_module.load_image
    monkeypatch.setattr(datasets_module, "load_image", lambda path: decoded.append(str(path)) or real_load(path))
    records = mix_datasets("qa:3", registry)  # every record three times
    broken = SourcedRecord({**records[-1].record, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                    {"from": "human", "value": "again"}]},
                           records[-1].source, records[-1].index, records[-1].image_dir, "qa")
    with pytest.raises(ValueError, match="must alternate"):
        ConversationDataset(records + [broken], tokenizer, "chatml", 256, to_tensor)
    assert decoded == []  # the malformed conversation stopped the build before any image was decoded
    dataset = ConversationDataset(records, tokenizer, "chatml", 256, to_tensor)
    assert len(dataset) == 18 and dataset.report.checked == 18
    assert sorted(decoded) == sorted({str(r.image_path) for r in records})  # 6 images, each decoded once
    missing = records[0].image_path
    missing.unlink()
    skipping = ConversationDataset(records, tokenizer, "chatml", 256, to_tensor, on_bad_image="skip")
    assert len(skipping) == 15 and skipping.report.counts == {"checked": 18, "skipped": 3, "missing": 3}


@pytest.mark.parametrize("max_length", [0, -5, 2.5])
def test_max_length_must_be_positive(tokenizer, max_length):
    with pytest.raises(ValueError, match="max_length must be a positive"):
        ConversationDataset([], tokenizer, "chatml", max_length)


def test_packed_records_round_trip_and_stay_about_the_size_of_their_json():
    """The dataset keeps its records packed (JSON bytes + integer arrays): measured with tracemalloc against the
    records' JSON size; the same records as dicts take about 4-5 times that (and get copied into every forked
    DataLoader worker as reading them touches reference counts)."""
    import gc
    import tracemalloc

    def make(n):
        return [SourcedRecord(_qa(f"{i:09d}", user=f"<image>\nQuestion {i}: what is in the picture, in detail?",
                                  answer=f"Answer {i}: a red bus next to a tall building.", image=f"img/{i}.jpg"),
                              f"part{i % 3}.json", i, Path(f"images{i % 3}") if i % 2 else None, f"set{i % 3}")
                for i in range(n)]

    items = make(3000)
    repeated = items + items[:1000]  # a ratio > 1 repeats records
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        packed = PackedRecords(repeated)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    json_bytes = sum(len(json.dumps(it.record, ensure_ascii=False).encode()) for it in items)
    assert retained < 1.5 * json_bytes, (retained, json_bytes)
    assert len(packed) == 4000 and packed == repeated and list(packed) == repeated
    assert packed[-1] == repeated[-1] and packed[3000] == items[0] and packed[10:12] == repeated[10:12]
    with pytest.raises(IndexError):
        packed[4000]


def test_dataset_keeps_its_records_packed(synthetic_sets, tokenizer):
    registry, _, _ = synthetic_sets
    records = mix_datasets("cap|qa:2", registry)
    dataset = ConversationDataset(records, tokenizer, "chatml", 256, to_tensor)
    assert isinstance(dataset.records, PackedRecords) and dataset.records == records
    for i in (0, 9, 10, len(records) - 1):
        assert torch.equal(dataset[i]["input_ids"], ConversationDataset([records[i]], tokenizer, "chatml", 256,
                                                                          to_tensor)[0]["input_ids"])


def test_packed_records_keep_records_that_share_a_source_and_index_apart():
    """Records built in code may all say ("inline", 0); only identical records may share storage."""
    items = [SourcedRecord(_qa(f"r{i}", image=None, user=f"Question {i}"), "inline", 0, None, "inline")
             for i in range(3)]
    assert PackedRecords(items + items[:1]) == items + items[:1]


# ------------------------------------------------------------------- max_records: a draw before the checks
def _text_records(prefix: str, n: int) -> list[dict]:
    return [_qa(f"{prefix}{i}", user=f"Question {i}?", answer=f"Answer {i}.", image=None) for i in range(n)]


@pytest.fixture()
def text_sets(tmp_path):
    """Two text-only datasets of 300 and 100 records, and a registry naming them."""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in _text_records("a", 300)) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(_text_records("b", 100)))
    return write_registry(tmp_path, {"a": {"path": "a.jsonl"}, "b": {"path": "b.json"}})


@pytest.mark.parametrize("spec, n, expected", [
    ("a|b", 40, {"a": 30, "b": 10}),  # 40 x 300/400 and 40 x 100/400
    ("a:0.5|b", 50, {"a": 30, "b": 20}),  # shares of the mix after the ratios: 150 and 100
    ("b|a", 7, {"b": 2, "a": 5}),  # 1.75 and 5.25: the larger remainder gets the odd record
])
def test_max_records_draws_every_dataset_in_proportion_in_mix_order(text_sets, tokenizer, spec, n, expected):
    """Not the first N of the mix (which would all come from its first dataset): every dataset's share of it."""
    config = DataConfig(spec=spec, registry=str(text_sets), max_length=64, max_records=n, seed=3)
    dataset = build_dataset(config, tokenizer)
    assert len(dataset) == n
    drawn = list(dataset.records)
    assert {name: sum(r.dataset == name for r in drawn) for name in expected} == expected
    mix = mix_datasets(spec, text_sets, seed=3)
    position = {(r.dataset, r.index): p for p, r in enumerate(mix)}
    order = [position[(r.dataset, r.index)] for r in drawn]
    assert order == sorted(set(order))  # records of the mix, each once, in mix order
    assert set(order) != set(range(n))  # not simply the head of the mix


def test_max_records_is_deterministic_for_a_seed(text_sets, tokenizer):
    def ids(seed):
        config = DataConfig(spec="a|b", registry=str(text_sets), max_length=64, max_records=20, seed=seed)
        return [r.record["id"] for r in build_dataset(config, tokenizer).records]

    assert ids(0) == ids(0) and ids(1) == ids(1)
    assert ids(0) != ids(1)
    assert len(mix_datasets("a|b", text_sets)) == len(sample_records(mix_datasets("a|b", text_sets), 1000))  # all


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_max_records_must_be_a_positive_count(n):
    with pytest.raises(ValueError, match=r"max_records \(--max-samples\) must be a positive number"):
        DataConfig(spec="a", max_records=n)


def test_only_the_drawn_records_are_checked(synthetic_sets, tokenizer, monkeypatch):
    """An unreadable image in a record the draw leaves out is never decoded (no error with on_bad_image='error');
    one in a drawn record still stops the build; skips are counted among the drawn records, so fewer remain."""
    import parrot.data.datasets as datasets_module

    registry, _, _ = synthetic_sets
    config = DataConfig(spec="cap|qa", registry=str(registry), max_length=256, max_records=8, seed=5)
    mix = mix_datasets("cap|qa", registry, seed=5)
    drawn = sample_records(mix, 8, seed=5)
    left_out = [r for r in mix if r not in drawn]
    assert {r.dataset for r in drawn} == {"cap", "qa"} and len(left_out) == 8
    for item in left_out:
        item.image_path.write_bytes(b"not an image")
    decoded = []
    real_load = datasets_module.load_image
    monkeypatch.setattr(datasets_module, "load_image", lambda path: decoded.append(str(path)) or real_load(path))
    dataset = build_dataset(config, tokenizer, to_tensor)
    assert dataset.records == drawn and dataset.report.counts == {"checked": 8, "skipped": 0}
    assert sorted(decoded) == sorted(str(r.image_path) for r in drawn)

    drawn[2].image_path.write_bytes(b"not an image either")
    with pytest.raises(BadImageError, match=rf"record {drawn[2].index} \(id '{drawn[2].record['id']}'\)"):
        build_dataset(config, tokenizer, to_tensor)
    skipping = build_dataset(dataclasses.replace(config, on_bad_image="skip"), tokenizer, to_tensor)
    assert len(skipping) == 7 and skipping.report.counts == {"checked": 8, "skipped": 1, "unreadable": 1}


# ------------------------------------------------------------------------- parallel image check
def test_threaded_image_check_gives_the_serial_result(synthetic_sets, tokenizer, monkeypatch):
    """Same kept records, same report entries in the same order, same first error, whatever the thread count, on a
    mix with missing and unreadable images, repeated records (ratio 2) and text-only records; and the threads are
    really used."""
    import threading
    import time

    import parrot.data.datasets as datasets_module

    registry, _, _ = synthetic_sets
    text_only = [SourcedRecord(_qa(f"t{i}", image=None, user=f"Hi {i}"), "inline", i, None, "inline") for i in range(3)]
    mix = mix_datasets("cap|qa:2", registry)
    records = mix[:5] + text_only[:2] + mix[5:] + text_only[2:]
    with_images = [r for r in mix if r.image_path is not None]
    with_images[1].image_path.unlink()
    for item in (with_images[4], with_images[11], with_images[12]):  # a caption image, two of qa's (used twice)
        item.image_path.write_bytes(b"broken")

    def build(workers, policy="skip"):
        return ConversationDataset(records, tokenizer, "chatml", 256, to_tensor, on_bad_image=policy,
                                   image_workers=workers)

    serial = build(1)
    assert serial.report.counts == {"checked": 22, "skipped": 6, "missing": 1, "unreadable": 5}
    threads = set()
    real_load = datasets_module.load_image

    def slow_load(path):
        threads.add(threading.current_thread().name)
        time.sleep(0.02)  # gives every thread a turn
        return real_load(path)

    monkeypatch.setattr(datasets_module, "load_image", slow_load)
    for workers in (2, 4):
        threads.clear()
        threaded = build(workers)
        assert threaded.records == serial.records
        assert threaded.report.to_dict() == serial.report.to_dict()
        assert len(threads) > 1 and all(name.startswith("parrot-image-check") for name in threads)
    errors = []
    for workers in (1, 4):
        with pytest.raises(BadImageError) as err:
            build(workers, "error")
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "not found" in errors[0]


def test_label_check_with_batched_tokenisation_decides_like_the_tokenizer(tokenizer):
    """The label check tokenises a chunk's texts in one batched call (_PretokenizedSegments): the same records are
    kept and skipped, in the same order, as deciding each record with the tokenizer itself, across chunks."""
    import parrot.data.datasets as datasets_module

    rng = np.random.default_rng(0)
    records = [SourcedRecord(_qa(f"r{i}", image=None, user="What colour is it? " * int(rng.integers(1, 12)),
                                 answer=["Blue.", "", "\n red"][i % 3]), "train.json", i, None, "qa")
               for i in range(datasets_module.LABEL_CHECK_CHUNK + 40)]
    dataset = ConversationDataset(records, tokenizer, "chatml", 90)
    reference = ConversationDataset([], tokenizer, "chatml", 90)
    expected = [r for r in records if reference._keeps_supervised_token(r)]
    assert dataset.records == expected and 0 < len(expected) < len(records)
    assert [i for _, i, _ in dataset.report.skipped] == [r.record["id"] for r in records if r not in expected]


class CountingTokenizer:
    """`tokenizer`, recording in `texts` every text it is called on (one or a batch)."""

    def __init__(self, tokenizer, texts: list):
        self.tokenizer, self.texts = tokenizer, texts

    def __call__(self, text, **kwargs):
        self.texts.extend([text] if isinstance(text, str) else text)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_batched_label_check_still_tokenises_only_the_decision_prefix(tokenizer):
    """Batched or not, the build-time check tokenises the conversation up to the first answer's head, never the later
    turns (counting every text of a batched call; training then tokenises the whole conversation)."""
    texts = []
    counting = CountingTokenizer(tokenizer, texts)

    later = "LATER " * 50
    conversations = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Blue. " * 40}] + [
        {"from": source, "value": later} for source in ("human", "gpt") * 3]
    records = [SourcedRecord({"id": f"r{i}", "conversations": conversations}, "inline", i, None, "d") for i in range(5)]
    dataset = ConversationDataset(records, counting, "chatml", 2048)
    assert len(dataset) == 5 and texts
    assert not any("LATER" in text for text in texts)
    assert sum(map(len, texts)) < len(get_template("chatml").render(llava_to_messages(conversations)))  # all 5
    texts.clear()
    dataset[0]
    assert any("LATER" in text for text in texts)


# ------------------------------------------------------------------------- leading assistant turn
def test_leading_assistant_turn_is_dropped_counted_and_the_record_kept(tmp_path, tokenizer):
    """As LLaVA's preprocess (`source = source[1:]` when the first turn is not from "human"): the record trains on
    the rest, the drop is listed in the report. Reference: the same conversation written without that turn."""
    records = [
        {"id": "lead", "conversations": [{"from": "gpt", "value": "Stray."}, {"from": "human", "value": "Q?"},
                                         {"from": "gpt", "value": "A."}]},
        _qa("plain", image=None, user="Q?", answer="A."),
        {"id": "sys", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "gpt", "value": "Hi."},
                                        {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    loaded = [SourcedRecord(r, str(path), i, None, "d") for i, r in enumerate(load_records(path))]
    dataset = ConversationDataset(loaded, tokenizer, "chatml", 128)
    assert len(dataset) == 3
    expected = [records[1]["conversations"], records[1]["conversations"],
                [records[2]["conversations"][0]] + records[2]["conversations"][2:]]
    for i, conversations in enumerate(expected):
        assert dataset.records[i].record["conversations"] == conversations
        reference = ConversationDataset([SourcedRecord({"id": "ref", "conversations": conversations}, "ref", 0, None,
                                                       "ref")], tokenizer, "chatml", 128)[0]
        assert torch.equal(dataset[i]["input_ids"], reference["input_ids"])
        assert torch.equal(dataset[i]["labels"], reference["labels"])
    assert "Stray." not in tokenizer.decode(dataset[0]["input_ids"])
    assert dataset.report.counts == {"checked": 0, "skipped": 0, "leading_assistant_turn_dropped": 2}
    changed = dataset.report.to_dict()["changed"]
    assert [(e["file"], e["id"], e["kind"]) for e in changed] == [
        (str(path), "lead", "leading_assistant_turn_dropped"), (str(path), "sys", "leading_assistant_turn_dropped")]
    assert "record 0 (id 'lead'): conversations[0] is an assistant turn" in changed[0]["reason"]
    assert "conversations[1]" in changed[1]["reason"]
    assert dataset.report.to_dict()["skipped"] == []
    with pytest.raises(ValueError, match="turn 0 is 'assistant'; drop that leading assistant turn"):
        llava_to_messages(records[0]["conversations"])  # outside a dataset: the error says what to do


def test_a_record_whose_only_answer_is_a_leading_turn_is_an_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_qa("ok", image=None, user="Q"), {"id": "x", "conversations": [
        {"from": "gpt", "value": "Stray."}, {"from": "human", "value": "Q?"}]}]))
    with pytest.raises(DataFormatError, match=r"data\.json: record 1 \(id 'x'\): 'conversations' has no assistant "
                                              r"turn \(from 'gpt'\) after its leading one \(conversations\[0\]"):
        load_records(path)


# ------------------------------------------------------------------------------------ duplicate ids
def test_duplicate_ids_in_a_file_are_a_warning_naming_them(tmp_path, caplog):
    records = [_qa(i, image=None, user="Q") for i in ["a", "b", "a", "c", "b", "a", "d"]]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n\n" +
                     "\n".join(json.dumps(r) for r in records[3:]) + "\n")  # a blank line 4: ids at file lines
    with caplog.at_level("WARNING", logger="parrot.data.datasets"):
        assert load_records(jsonl) == records  # still loaded, all of them
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"{jsonl}: 2 record ids occur more than once (5 records)" in message
    assert "'a' at lines 1, 3, 7; 'b' at lines 2, 6" in message
    caplog.clear()
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(records))
    with caplog.at_level("WARNING", logger="parrot.data.datasets"):
        load_records(as_json)
    assert "'a' at records 0, 2, 5; 'b' at records 1, 4" in caplog.records[0].getMessage()
    caplog.clear()
    many = tmp_path / "many.json"
    many.write_text(json.dumps([_qa(f"id{i % 7}", image=None, user="Q") for i in range(14)] +
                               [_qa(5, image=None, user="Q"), _qa("5", image=None, user="Q")]))
    with caplog.at_level("WARNING", logger="parrot.data.datasets"):
        load_records(many)
    message = caplog.records[0].getMessage()
    assert "8 record ids occur more than once (16 records)" in message  # 5 and "5": the same id in the report
    assert "'id4' at records 4, 11" in message and "'id5'" not in message and "(and 3 more)" in message
    caplog.clear()
    unique = tmp_path / "unique.json"
    unique.write_text(json.dumps(records[:2]))
    with caplog.at_level("WARNING", logger="parrot.data.datasets"):
        load_records(unique)
    assert caplog.records == []


# ---------------------------------------------------------------------------------- text budget per record
def _growing_conversation(tokenizer, first_user_prefix: str, lower: int, upper: int) -> list[dict]:
    """Short exchanges until the whole conversation tokenises to more than `lower` and at most `upper` tokens."""
    turns = []
    for i in range(200):
        prefix = first_user_prefix if i == 0 else ""
        turns += [{"from": "human", "value": f"{prefix}Colour {i}?"}, {"from": "gpt", "value": "Blue."}]
        n = len(get_template("chatml").tokenize(llava_to_messages(turns), tokenizer, 10 ** 6)[0])
        if n > lower:
            assert n <= upper, (lower, n, upper)
            return turns
    raise AssertionError("conversation never grew past the lower bound")


def test_only_a_record_with_an_image_gives_up_the_visual_tokens_positions(tokenizer, tmp_path):
    """max_length counts LLM positions: a text-only record is truncated at max_length text tokens (as LLaVA does at
    model_max_length); only a record with an image keeps image_extra_tokens fewer (its <image> expands to that many
    more positions). Reference: the template's truncation at those lengths, applied to the raw conversation."""
    max_length, extra = 128, 40
    template = get_template("chatml")
    text_turns = _growing_conversation(tokenizer, "", max_length - extra, max_length)
    image_turns = _growing_conversation(tokenizer, "<image>\n", max_length - extra, max_length)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    records = [{"id": "text", "conversations": text_turns},
               {"id": "img", "image": "a.png", "conversations": image_turns}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    registry = write_registry(tmp_path, {"d": {"path": "d.json", "image_dir": str(tmp_path)}})
    report = tmp_path / "bad.json"
    config = DataConfig(spec="d", registry=str(registry), max_length=max_length, image_extra_tokens=extra,
                        bad_data_report=str(report))
    built = build_dataset(config, tokenizer, to_tensor)
    direct = ConversationDataset(mix_datasets("d", registry), tokenizer, "chatml", max_length, to_tensor,
                                 image_extra_tokens=extra)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for dataset in (built, direct):
        assert [r.record["id"] for r in dataset.records] == ["text", "img"]
        expected = ((dataset[0], text_turns, max_length), (dataset[1], image_turns, max_length - extra))
        for item, turns, budget in expected:
            ids, labels = template.tokenize(llava_to_messages(turns), tokenizer, budget)
            assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
        text_ids, image_ids = dataset[0]["input_ids"].tolist(), dataset[1]["input_ids"].tolist()
        # the text-only record is whole (it fits max_length); the image record is cut, and fits once expanded
        assert text_ids == template.tokenize(llava_to_messages(text_turns), tokenizer, 10 ** 6)[0]
        assert len(text_ids) > max_length - extra
        assert image_ids.count(image_id) == 1 and len(image_ids) + extra <= max_length
        assert dataset.text_budget(dataset.records[0]) == max_length
        assert dataset.text_budget(dataset.records[1]) == max_length - extra
    assert json.loads(report.read_text())["counts"] == {"checked": 1, "skipped": 0}
    # image_extra_tokens=0 (the default) counts text tokens only: the image record is then kept whole as well
    plain = ConversationDataset(mix_datasets("d", registry), tokenizer, "chatml", max_length, to_tensor)
    assert plain[1]["input_ids"].tolist() == template.tokenize(llava_to_messages(image_turns), tokenizer, 10 ** 6)[0]


def test_label_check_uses_the_records_own_text_budget(tokenizer, tmp_path):
    """A first user turn that fits max_length but not max_length - image_extra_tokens: the text-only record keeps its
    answer, the same text with an image loses it and is a counted skip naming its budget. Reference: the template's
    own truncation of each conversation at the LLaVA budget."""
    max_length, extra = 96, 48
    template = get_template("chatml")
    question = "What colour is it? " * 6
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    text = _qa("text", image=None, user=question, answer="Blue.")
    with_image = _qa("img", user="<image>\n" + question.strip(), answer="Blue.")
    for record, budget in ((text, max_length), (with_image, max_length - extra)):
        labels = template.tokenize(llava_to_messages(record["conversations"]), tokenizer, budget)[1]
        assert any(label != IGNORE_INDEX for label in labels) == (record is text)  # what LLaVA's budget decides
    items = [SourcedRecord(r, "train.json", i, tmp_path, "d") for i, r in enumerate([text, with_image])]
    dataset = ConversationDataset(items, tokenizer, "chatml", max_length, to_tensor, image_extra_tokens=extra)
    assert [r.record["id"] for r in dataset.records] == ["text"]
    assert dataset.report.counts == {"checked": 0, "skipped": 1, "no_supervised_tokens": 1}
    (entry,) = dataset.report.to_dict()["skipped"]
    assert entry["id"] == "img"
    assert f"within {max_length - extra} text tokens (max_length={max_length}" in entry["reason"]


@pytest.mark.parametrize("extra, message", [(-1, "image_extra_tokens must be"), (1.5, "image_extra_tokens must be"),
                                            (True, "image_extra_tokens must be"), (64, "leaves no text token")])
def test_image_extra_tokens_must_leave_room(tokenizer, extra, message):
    with pytest.raises(ValueError, match=message):
        ConversationDataset([], tokenizer, "chatml", 64, image_extra_tokens=extra)


# ------------------------------------------------------------------------- image placeholder position
def _llava_preprocess_multimodal(conversations):
    """LLaVA v1.5 `llava/train/train.py` preprocess_multimodal (mm_use_im_start_end off), on a copy."""
    out = []
    for sentence in conversations:
        value = sentence["value"]
        if "<image>" in value:
            value = value.replace("<image>", "").strip()
            value = "<image>" + "\n" + value
            value = value.strip()
        out.append({**sentence, "value": value})
    return out


def test_image_placeholder_goes_to_the_front_of_its_turn_as_in_llava(tokenizer, tmp_path):
    """A record written "question\\n<image>" trains with the placeholder first, as LLaVA's preprocess_multimodal
    lays it out and inference prompts it; the checks tokenise that text too, and the changed records are listed in
    the report. Reference: LLaVA's preprocess_multimodal (re-implemented above), then the template."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    records = [
        _qa("after", user="What colour is it?\n<image>"),
        _qa("front", user="<image>\nWhat colour is it?"),
        _qa("middle", user="What colour  <image>  is it? "),
        _qa("text", image=None, user="What colour is it?\n"),  # no image: left alone, as in LLaVA
        {"id": "second", "image": "a.png", "conversations": [
            {"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi."},
            {"from": "human", "value": "And this one?  <image>"}, {"from": "gpt", "value": "Red."}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    texts = []
    counting = CountingTokenizer(tokenizer, texts)

    loaded = [SourcedRecord(r, str(path), i, tmp_path, "d") for i, r in enumerate(load_records(path))]
    dataset = ConversationDataset(loaded, counting, "chatml", 256, to_tensor)
    assert len(dataset) == len(records)
    template = get_template("chatml")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for i, record in enumerate(records):
        conversations = record["conversations"]
        expected = _llava_preprocess_multimodal(conversations) if "image" in record else conversations
        ids, labels = template.tokenize(llava_to_messages(expected), tokenizer, 256)
        assert dataset[i]["input_ids"].tolist() == ids and dataset[i]["labels"].tolist() == labels, record["id"]
    # "after" trains exactly as the same question written image-first (inference's layout)
    assert torch.equal(dataset[0]["input_ids"], dataset[1]["input_ids"])
    user = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    ids = dataset[0]["input_ids"].tolist()
    assert ids[ids.index(image_id) - len(user):ids.index(image_id)] == user
    # the build-time checks tokenised the moved text, never the record's original layout
    assert not any("is it?\n<image>" in t or "<image>  is" in t or "?  <image>" in t for t in texts)
    assert any("user\n<image>\nWhat colour is it?<" in t for t in texts)
    assert dataset.report.counts == {"checked": 4, "skipped": 0, "image_placeholder_moved_to_front": 3}
    changed = dataset.report.to_dict()["changed"]
    assert [(e["file"], e["id"], e["kind"]) for e in changed] == [
        (str(path), rid, "image_placeholder_moved_to_front") for rid in ("after", "middle", "second")]
    assert "record 0 (id 'after'): conversations[0]" in changed[0]["reason"]
    assert "conversations[2]" in changed[2]["reason"]


def test_several_placeholders_are_never_collapsed():
    """Only the one-placeholder case is normalised; a conversation with several (not loadable: one image per
    record) is returned as it is, never with two placeholders merged into one."""
    from parrot.data.datasets import image_placeholder_first

    one = [{"from": "human", "value": "Q?\n<image>"}, {"from": "gpt", "value": "A."}]
    assert image_placeholder_first(one) == _llava_preprocess_multimodal(one)
    assert one[0]["value"] == "Q?\n<image>"  # not modified in place
    for several in ([{"from": "human", "value": "<image> vs <image>?"}, {"from": "gpt", "value": "A."}],
                    [{"from": "human", "value": "Q\n<image>"}, {"from": "gpt", "value": "A."},
                     {"from": "human", "value": "R\n<image>"}, {"from": "gpt", "value": "B."}]):
        assert image_placeholder_first(several) is several
    front = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    assert image_placeholder_first(front) is front


def test_report_lists_a_bounded_number_of_changes_per_kind_and_counts_all(monkeypatch):
    """A change can concern most records of a large mix: listed up to the cap per kind, counted in full."""
    from parrot.data import datasets

    monkeypatch.setattr(datasets, "CHANGES_LISTED_PER_KIND", 3)
    monkeypatch.setattr(datasets, "SKIPS_LISTED_PER_KIND", 2)
    report = datasets.BadDataReport()
    for i in range(5):
        report.add_change("a.json", str(i), "moved", datasets.IMAGE_PLACEHOLDER_MOVED_TO_FRONT)
        report.add(f"img{i}.png", str(i), "no such file", "missing")  # e.g. a wrong image folder: every image
    report.add_change("a.json", "x", "dropped", datasets.LEADING_ASSISTANT_TURN_DROPPED)
    report.add("a.json", "y", "too long", datasets.NO_SUPERVISED_TOKENS)
    written = report.to_dict()
    assert written["counts"][datasets.IMAGE_PLACEHOLDER_MOVED_TO_FRONT] == 5
    assert written["counts"][datasets.LEADING_ASSISTANT_TURN_DROPPED] == 1
    assert [c["id"] for c in written["changed"]] == ["0", "1", "2", "x"]
    assert written["changed_listed_per_kind"] == 3
    assert (written["counts"]["skipped"], written["counts"]["missing"], written["counts"][datasets.NO_SUPERVISED_TOKENS]) \
        == (6, 5, 1)
    assert [(s["id"], s["kind"]) for s in written["skipped"]] == [("0", "missing"), ("1", "missing"),
                                                                   ("y", datasets.NO_SUPERVISED_TOKENS)]
    assert written["skipped_listed_per_kind"] == 2


def test_building_a_dataset_pauses_the_cyclic_gc_and_restores_it(monkeypatch):
    """The build pauses the cyclic collector (its many JSON containers hold no cycles) and puts it back as it
    was, also when the build fails."""
    import gc

    from parrot.data import datasets

    seen = []
    monkeypatch.setattr(datasets, "_build_dataset", lambda *a, **k: seen.append(gc.isenabled()) or "built")
    try:
        assert gc.isenabled() and datasets.build_dataset(None, None) == "built" and gc.isenabled()
        gc.disable()
        assert datasets.build_dataset(None, None) == "built" and not gc.isenabled()
        gc.enable()

        def fail(*a, **k):
            raise DataFormatError("bad")
        monkeypatch.setattr(datasets, "_build_dataset", fail)
        with pytest.raises(DataFormatError):
            datasets.build_dataset(None, None)
        assert gc.isenabled()
    finally:
        gc.enable()
    assert seen == [False, False]
