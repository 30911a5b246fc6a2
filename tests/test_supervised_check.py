"""The dataset's build-time check (does a record keep a supervised token after truncation?) decides from a prefix
of the conversation exactly what tokenising the whole conversation decides, and does not tokenise the whole."""

import random

import pytest

from parrot.data.datasets import NO_SUPERVISED_TOKENS, ConversationDataset, SourcedRecord
from parrot.data.templates import IGNORE_INDEX, IMAGE_TOKEN, get_template, llava_to_messages, segment_ids
from parrot.data.tokenizer import build_tiny_tokenizer

WORDS = "red blue circle square how many colour 红色 蓝色 красный круг أحمر kırmızı azul , . ?".split()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer(vocab_size=400, n_texts=300)


class CountingTokenizer:
    """A tokenizer that records every text it is asked to tokenise, each text of a batched call on its own
    (everything else is delegated)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.texts: list[str] = []

    def __call__(self, text, **kwargs):
        self.texts.extend([text] if isinstance(text, str) else text)
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class BlankDroppingTokenizer(CountingTokenizer):
    """Gives no id for whitespace-only text and has no eos string, so a Llama-2 answer "" is a labelled segment
    without tokens (as with tokenizers whose normaliser strips whitespace): the check must look past it."""

    eos_token = ""

    def __call__(self, text, **kwargs):
        if not isinstance(text, str):  # a batch, as HF tokenizers take one (`segments_ids`): each text on its own
            return {"input_ids": [self(t, **kwargs)["input_ids"] for t in text]}
        return {"input_ids": []} if not text.strip() else super().__call__(text, **kwargs)


def random_messages(rng: random.Random) -> list[dict]:
    """1-4 exchanges of random length (answers may be empty or start with "\\n"), 0-2 placeholders anywhere."""
    messages = []
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 25)))})
        answer = " ".join(rng.choices(WORDS, k=rng.choice([0, 1, 3, 12])))
        messages.append({"role": "assistant", "content": rng.choice(["", "\n"]) + answer})
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        m = rng.choice([0] * 4 + list(range(len(messages))))  # mostly the first user turn, as in LLaVA
        messages[m]["content"] = f"{IMAGE_TOKEN}\n{messages[m]['content']}"
    return messages


def boundary_lengths(template, messages, tokenizer) -> list[int]:
    """max_length values around every segment boundary, the first labelled token and every placeholder."""
    segments = template.with_special_tokens(tokenizer).segments(messages)
    points, pos = [], 0
    for seg in segments:
        ids = segment_ids(seg, tokenizer)
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        points += [pos, pos + 1] + [pos + k for k, token in enumerate(ids) if token == image_id]
        pos += len(ids)
    points.append(pos)
    return sorted({p + d for p in points for d in (-1, 0, 1) if p + d >= 1})


def outcome(decide):
    """True/False, or the ValueError's message."""
    try:
        return decide()
    except ValueError as err:
        return str(err)


@pytest.mark.parametrize("template_name", ["chatml", "llama"])
@pytest.mark.parametrize("blank_dropping", [False, True])
def test_prefix_decision_equals_full_tokenisation(tiny, template_name, blank_dropping):
    template = get_template(template_name)
    tokenizer = BlankDroppingTokenizer(tiny) if blank_dropping else tiny
    rng = random.Random(f"{template_name}-{blank_dropping}")
    seen = set()
    for r in range(40):
        messages = random_messages(rng)
        for max_length in boundary_lengths(template, messages, tokenizer):
            name = f"record {r} at max_length={max_length}"

            def full():
                _, labels = template.tokenize(messages, tokenizer, max_length, record_id=name)
                return any(label != IGNORE_INDEX for label in labels)

            expected = outcome(full)
            assert outcome(lambda: template.keeps_supervised_token(messages, tokenizer, max_length,
                                                                   record_id=name)) == expected, name
            seen.add(expected if isinstance(expected, bool) else "error")
    assert seen == {True, False, "error"}  # every kind of decision was compared


def llava_record(index: int, conversations: list[tuple[str, str]], image: str | None = None) -> SourcedRecord:
    record = {"id": f"r{index}", "conversations": [
        {"from": source, "value": value} for user, answer in conversations
        for source, value in (("human", user), ("gpt", answer))]}
    if image is not None:
        record["image"] = image
    return SourcedRecord(record, "train.json", index, None, "test")


def test_dataset_skips_the_records_full_tokenisation_would_skip(tiny):
    """Same kept records and report as deciding from each record's full tokenisation, also at the boundary: a
    max_length that ends right before / right at the first answer token."""
    template = get_template("chatml")
    rng = random.Random(3)
    records = [llava_record(i, [(" ".join(rng.choices(WORDS, k=rng.randint(1, 40))), "Blue.")] * rng.randint(1, 3))
               for i in range(150)]
    starts = set()  # where each record's first answer token is
    for r in records:
        labels = template.tokenize(llava_to_messages(r.record["conversations"]), tiny, 10_000)[1]
        starts.add(next(i for i, label in enumerate(labels) if label != IGNORE_INDEX))
    # answers whose first token is the last one inside the window, and answers starting right after it
    max_length = min(p for p in starts if p - 1 in starts and p > 60)

    def keeps(item):
        labels = template.tokenize(llava_to_messages(item.record["conversations"]), tiny, max_length)[1]
        return any(label != IGNORE_INDEX for label in labels)

    expected = [r for r in records if keeps(r)]
    dataset = ConversationDataset(records, tiny, template, max_length)
    assert dataset.records == expected and 0 < len(expected) < len(records)
    skipped = len(records) - len(expected)
    assert dataset.report.counts == {"checked": 0, "skipped": skipped, NO_SUPERVISED_TOKENS: skipped}
    assert all(f"train.json: record {i[1:]} (id '{i}')" in reason for _, i, reason in dataset.report.skipped)


def test_build_time_check_does_not_tokenise_whole_conversations(tiny):
    """Only the prefix up to the first answer is tokenised when the dataset is built; later turns are not."""
    later = "LATER " * 50
    records = [llava_record(i, [("What colour?", "Blue. " * 40)] + [(later, later)] * 3) for i in range(5)]
    counting = CountingTokenizer(tiny)
    dataset = ConversationDataset(records, counting, "chatml", max_length=2048)
    assert len(dataset) == 5
    built = sum(map(len, counting.texts))
    assert not any("LATER" in text for text in counting.texts)
    rendered = sum(len(get_template("chatml").render(llava_to_messages(r.record["conversations"]))) for r in records)
    assert built < rendered / 5  # not the first answer in full either: its head tells whether it gives a token
    counting.texts.clear()
    dataset[0]  # training itself tokenises the whole conversation
    assert any("LATER" in text for text in counting.texts)


def test_placeholder_cut_at_build_time_names_the_record(tiny, tmp_path):
    """A placeholder in a trailing turn that truncation drops is still an error when the dataset is built."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    record = llava_record(7, [("first " * 5, "ok"), (f"{IMAGE_TOKEN}\n" + "second " * 40, "ok")], image="a.png")
    record = SourcedRecord(record.record, str(tmp_path / "train.json"), 7, tmp_path, "test")
    with pytest.raises(ValueError, match=r"train.json: record 7 \(id 'r7'\): truncating to max_length=40 text tokens "
                                         r"would cut an '<image>' placeholder; raise the processor's model_max_length"):
        ConversationDataset([record], tiny, "chatml", max_length=40, image_transform=lambda image: image)
    # an image record's budget is max_length less its visual tokens: the message says so (it said max_length=30)
    with pytest.raises(ValueError, match=r"truncating to 30 text tokens \(max_length=40 less 10 positions of the "
                                         r"image's visual tokens\) would cut"):
        ConversationDataset([record], tiny, "chatml", max_length=40, image_transform=lambda image: image,
                            image_extra_tokens=10)
