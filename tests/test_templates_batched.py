"""`ChatTemplate.tokenize` / `encode` tokenise a conversation's segments in one batched tokenizer call
(`segments_ids`), and give exactly the ids of tokenising every segment on its own, for each kind of tokenizer the
tests use: the project's tiny byte-level BPE, a Qwen2-style one (its pre-tokeniser joins runs of newlines), a Hugging
Face tokenizer whose normaliser strips whitespace (no id at all for a whitespace-only text), and a wrapper that gives
no id for whitespace-only text by itself (as tests/test_supervised_check.py's)."""

import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from parrot.data.templates import IGNORE_INDEX, IMAGE_TOKEN, PlaceholderCutError, get_template, segments_ids
from parrot.data.tokenizer import IM_END, IM_START, PAD_TOKEN, SPECIAL_TOKENS, build_tiny_tokenizer

# Qwen2's pre-tokenisation regex (as in tests/test_segmentwise_prompts.py)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ("red blue circle square how many colour 红色 蓝色 красный круг أحمر kırmızı azul , . ? "
         "\n \n\n").split(" ")
# contents that give empty or whitespace-only segments (a Llama-2 answer "" is the segment "  " without an eos)
ODD_CONTENTS = ["", " ", "\n", "\n\n", "  \n ", "\t", "\nRed.", "Red.\n\n"]


def hf_tokenizer(normalizer, split: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level]) if split else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    backend.train_from_iterator([" ".join(rng.choices(WORDS, k=12)) for _ in range(300)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=IM_END,
                                   extra_special_tokens=[IM_START, IMAGE_TOKEN], padding_side="right",
                                   clean_up_tokenization_spaces=False)


class Calls:
    """`tokenizer`, counting its calls; `single=True` answers a batch by one call per text (the unbatched path)."""

    def __init__(self, tokenizer, single: bool = False):
        self._tokenizer, self._single, self.calls = tokenizer, single, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        if self._single and not isinstance(text, str):
            return {"input_ids": [self._tokenizer(t, **kwargs)["input_ids"] for t in text]}
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class BlankDropping(Calls):
    """No id for whitespace-only text and no eos string (tests/test_supervised_check.py's tokenizer), each text of a
    batch on its own."""

    eos_token = ""

    def __call__(self, text, **kwargs):
        if not isinstance(text, str):
            self.calls += 1
            return {"input_ids": [self._tokenizer(t, **kwargs)["input_ids"] if t.strip() else [] for t in text]}
        return {"input_ids": []} if not text.strip() else super().__call__(text, **kwargs)


TOKENIZERS = {
    "tiny": lambda: build_tiny_tokenizer(vocab_size=400, n_texts=300),
    "qwen2_split": lambda: hf_tokenizer(normalizers.NFC(), split=True),
    "strip_normaliser": lambda: hf_tokenizer(normalizers.Sequence([normalizers.NFC(), normalizers.Strip()]),
                                             split=True),
    "blank_dropping": lambda: BlankDropping(build_tiny_tokenizer(vocab_size=400, n_texts=300)),
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def random_messages(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": rng.choice(["", " ", "Be brief."])}] if rng.random() < 0.3 else []
    for t in range(rng.randint(1, 4)):
        for role in ("user", "assistant"):
            content = rng.choice(ODD_CONTENTS) if rng.random() < 0.3 \
                else " ".join(rng.choices(WORDS, k=rng.randint(1, 15)))
            if role == "user" and t == 0 and rng.random() < 0.6:
                content = f"{IMAGE_TOKEN}\n{content}"
            messages.append({"role": role, "content": content})
    return messages


def per_segment(template, messages, tokenizer, add_generation_prompt=False):
    """Reference: every segment tokenised by its own tokenizer call; (ids, labels, labelled flags)."""
    ids, labels, flags = [], [], []
    for seg in template.with_special_tokens(tokenizer).segments(messages, add_generation_prompt):
        seg_ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        ids += seg_ids
        labels += seg_ids if seg.labelled else [IGNORE_INDEX] * len(seg_ids)
        flags += [seg.labelled] * len(seg_ids)
    return ids, labels, flags


def outcome(fn):
    try:
        return fn()
    except PlaceholderCutError as err:
        return str(err)


@pytest.mark.parametrize("name", ["chatml", "llama"])
def test_batched_segments_give_the_per_segment_ids(tokenizer, name):
    """Same ids and labels as one tokenizer call per segment, in one call per conversation; also under truncation
    (against the same tokenizer answering the batch text by text), and the same for `encode`."""
    template = get_template(name)
    rng = random.Random(name)
    empty_segments = 0
    for r in range(60):
        messages = random_messages(rng)
        segments = template.with_special_tokens(tokenizer).segments(messages)
        empty_segments += sum(not tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in segments)
        ids, labels, flags = per_segment(template, messages, tokenizer)

        counted = Calls(tokenizer)
        assert template.tokenize(messages, counted, 10_000) == (ids, labels), r
        assert counted.calls == 1  # one batched call, not one per segment
        counted = Calls(tokenizer)
        assert template.encode(messages, counted) == (ids, flags), r
        assert counted.calls == 1
        prompt = messages[:-1]
        assert template.encode(prompt, tokenizer, add_generation_prompt=True) \
            == per_segment(template, prompt, tokenizer, add_generation_prompt=True)[::2], r

        single = Calls(tokenizer, single=True)
        for max_length in sorted({1, 2, len(ids) // 3, len(ids) // 2, len(ids) - 1, len(ids)} - {0}):
            assert outcome(lambda: template.tokenize(messages, tokenizer, max_length)) \
                == outcome(lambda: template.tokenize(messages, single, max_length)), (r, max_length)
    assert empty_segments > 0 or not isinstance(tokenizer, BlankDropping)  # the special case was exercised


def test_segments_ids_edge_cases(tokenizer):
    template = get_template("chatml")
    assert segments_ids([], tokenizer) == []
    segments = template.segments([{"role": "user", "content": ""}, {"role": "assistant", "content": " "}])
    assert segments_ids(segments, tokenizer) == [tokenizer(s.text, add_special_tokens=False)["input_ids"]
                                                for s in segments]


def test_a_tokenizer_that_takes_the_batch_as_one_text_is_an_error():
    """A tokenizer that does not take a list of texts must not misalign the labels silently."""
    tiny = build_tiny_tokenizer(vocab_size=400, n_texts=300)

    def flat(text, **kwargs):
        return {"input_ids": tiny("".join(text), **kwargs)["input_ids"]}

    segments = get_template("chatml").segments([{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                                                    "content": "Red."}])
    with pytest.raises(ValueError, match="list of texts"):
        segments_ids(segments, flat)
