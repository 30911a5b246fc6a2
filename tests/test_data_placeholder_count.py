"""The report's `image_placeholder_moved_to_front` count names only records whose placeholder really moved (some
text stood before it in its turn); a placeholder already first whose turn only had the whitespace around it
normalised is trained the same (LLaVA's preprocess_multimodal strips it too) but not counted."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from parrot.data.datasets import IMAGE_PLACEHOLDER_MOVED_TO_FRONT, ConversationDataset, SourcedRecord, load_records
from parrot.data.templates import get_template, llava_to_messages
from parrot.data.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(vocab_size=400, n_texts=300)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def llava_preprocess_multimodal(conversations):
    """LLaVA v1.5 `llava/train/train.py` preprocess_multimodal (mm_use_im_start_end off), on a copy."""
    out = []
    for sentence in conversations:
        value = sentence["value"]
        if "<image>" in value:
            value = ("<image>" + "\n" + value.replace("<image>", "").strip()).strip()
        out.append({**sentence, "value": value})
    return out


def record(record_id, user, image="a.png"):
    out = {"id": record_id, "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": "Red."}]}
    if image is not None:
        out["image"] = image
    return out


WHITESPACE_ONLY = {  # placeholder already first: only the whitespace around it changes
    "space_before": " <image>\nWhat colour is it?",
    "no_newline": "<image>What colour is it?",
    "spaces_around": "\n <image>  What colour is it? ",
    "trailing": "<image>\nWhat colour is it?\n",
    "only_image": " <image> ",
}
MOVED = {  # text before the placeholder: it moves
    "after": "What colour is it?\n<image>",
    "middle": "What colour <image> is it?",
    "one_char": "?<image>\nWhat colour is it",
}


def test_only_really_moved_placeholders_are_counted(tokenizer, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    records = [record(rid, user) for rid, user in {**WHITESPACE_ONLY, **MOVED}.items()]
    records += [record("front", "<image>\nWhat colour is it?"), record("text", " What colour? ", image=None)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    loaded = [SourcedRecord(r, str(path), i, tmp_path, "d") for i, r in enumerate(load_records(path))]
    dataset = ConversationDataset(loaded, tokenizer, "chatml", 256, to_tensor)
    assert len(dataset) == len(records)

    # every record trains as LLaVA lays it out, counted or not (the normalisation itself is unchanged)
    template = get_template("chatml")
    for i, r in enumerate(records):
        expected = llava_preprocess_multimodal(r["conversations"]) if "image" in r else r["conversations"]
        assert dataset.records[i].record["conversations"] == expected, r["id"]
        ids, labels = template.tokenize(llava_to_messages(expected), tokenizer, 256)
        assert dataset[i]["input_ids"].tolist() == ids and dataset[i]["labels"].tolist() == labels, r["id"]
    for rid in WHITESPACE_ONLY:  # they did change
        r = next(r for r in records if r["id"] == rid)
        assert llava_preprocess_multimodal(r["conversations"]) != r["conversations"], rid

    # only the moved ones are counted and listed, with a reason saying so
    assert dataset.report.counts == {"checked": len(records) - 1, "skipped": 0,
                                     IMAGE_PLACEHOLDER_MOVED_TO_FRONT: len(MOVED)}
    changed = dataset.report.to_dict()["changed"]
    assert [(e["id"], e["kind"]) for e in changed] == [(rid, IMAGE_PLACEHOLDER_MOVED_TO_FRONT) for rid in MOVED]
    for entry in changed:
        assert "conversations[0]: '<image>' placeholder moved to the front of the turn, from after some of its text" \
            in entry["reason"], entry
        assert "already first" not in entry["reason"]


def test_whitespace_only_changes_log_no_move(tokenizer, tmp_path, caplog):
    """A mix whose placeholders are all first (with untidy whitespace) reports and logs no move."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    loaded = [SourcedRecord(record(rid, user), "inline", i, tmp_path, "d")
              for i, (rid, user) in enumerate(WHITESPACE_ONLY.items())]
    with caplog.at_level("WARNING", logger="parrot.data.datasets"):
        dataset = ConversationDataset(loaded, tokenizer, "chatml", 256, to_tensor)
    assert dataset.report.changed == [] and IMAGE_PLACEHOLDER_MOVED_TO_FRONT not in dataset.report.counts
    assert not any("moved the image placeholder" in m for m in caplog.messages)
    assert all(r.record["conversations"][0]["value"].startswith("<image>\n") or r.record["conversations"][0]["value"]
               == "<image>" for r in dataset.records)
