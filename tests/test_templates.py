import pytest

from parrot.data.templates import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    LLAMA2_SYSTEM_PROMPT,
    get_template,
    llava_to_messages,
)
from parrot.data.tokenizer import build_tiny_tokenizer

MESSAGES = [
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "Red"},
    {"role": "user", "content": "Сколько кругов на картинке?"},
    {"role": "assistant", "content": "Два"},
    {"role": "user", "content": "图中有几个圆形？"},
    {"role": "assistant", "content": "两个"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(vocab_size=1000, seed=0, n_texts=1500)


def labelled_spans(ids, labels):
    """Contiguous runs of labelled positions, as (start, end) pairs (naive loop reference)."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_chatml_render_is_qwen_format():
    text = get_template("chatml").render(MESSAGES[:2], add_generation_prompt=False)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n"
                    "<|im_start|>assistant\nRed<|im_end|>\n")
    prompt = get_template("chatml").render(MESSAGES[:1], add_generation_prompt=True, system="Be brief.")
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n")


def test_llama_render_is_llama2_format():
    text = get_template("llama").render(MESSAGES[:4])
    assert text == (f"<s>[INST] <<SYS>>\n{LLAMA2_SYSTEM_PROMPT}\n<</SYS>>\n\n<image>\nWhat colour is the circle? "
                    "[/INST] Red </s><s>[INST] Сколько кругов на картинке? [/INST] Два </s>")


@pytest.mark.parametrize("name", ["chatml", "llama"])
def test_labels_cover_exactly_the_answers(tokenizer, name):
    template = get_template(name)
    ids, labels = template.tokenize(MESSAGES, tokenizer, max_length=512)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    spans = labelled_spans(ids, labels)
    decoded = [tokenizer.decode(ids[a:b]) for a, b in spans]
    answers = [m["content"] for m in MESSAGES if m["role"] == "assistant"]
    eos = tokenizer.eos_token
    expected = [f"{a}<|im_end|>" for a in answers] if name == "chatml" else [f" {a} {eos}" for a in answers]
    assert decoded == expected
    # the unlabelled rest decodes to everything else, i.e. no answer text leaks into the prompt part
    prompt_text = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert all(a not in prompt_text for a in answers)


def test_segmentwise_ids_equal_whole_string_tokenization(tokenizer):
    # The tiny tokenizer never merges across a template boundary, so this checks that the segments render the
    # string; a byte-level BPE can differ here (tests/test_segmentwise_prompts.py), which is why ids are segment-wise.
    template = get_template("chatml")
    ids, _ = template.tokenize(MESSAGES, tokenizer, max_length=512)
    assert ids == tokenizer(template.render(MESSAGES), add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1


def test_truncation_drops_trailing_turns_and_keeps_image(tokenizer):
    template = get_template("chatml")
    full, _ = template.tokenize(MESSAGES, tokenizer, max_length=512)
    first_turn, first_labels = template.tokenize(MESSAGES[:2], tokenizer, max_length=512)
    ids, labels = template.tokenize(MESSAGES, tokenizer, max_length=len(full) - 1)
    two_turns, _ = template.tokenize(MESSAGES[:4], tokenizer, max_length=512)
    assert ids == two_turns  # the third turn is dropped whole
    ids, labels = template.tokenize(MESSAGES, tokenizer, max_length=len(first_turn) + 1)
    assert (ids, labels) == (first_turn, first_labels)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cut = len(first_turn) - 3  # first turn alone too long: cut token-wise, image kept
    ids, labels = template.tokenize(MESSAGES, tokenizer, max_length=cut)
    assert ids == first_turn[:cut] and labels == first_labels[:cut] and image_id in ids


def test_truncation_never_cuts_the_image(tokenizer):
    template = get_template("chatml")
    image_at = template.tokenize(MESSAGES, tokenizer, 512)[0].index(tokenizer.convert_tokens_to_ids("<image>"))
    template.tokenize(MESSAGES, tokenizer, max_length=image_at + 1)  # placeholder is the last kept token: fine
    with pytest.raises(ValueError, match="record-7.*<image>"):
        template.tokenize(MESSAGES, tokenizer, max_length=image_at, record_id="record-7")


def test_system_sources(tokenizer):
    template = get_template("chatml")
    with_system = [{"role": "system", "content": "Answer in one word."}] + MESSAGES[:2]
    assert "Answer in one word." in template.render(with_system)
    assert DEFAULT_SYSTEM_PROMPT not in template.render(with_system)
    assert "Override" in template.render(with_system, system="Override")


def test_missing_image_token_in_tokenizer_is_an_error(tokenizer):
    class NoImage:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(ValueError, match="no '<image>' token"):
        get_template("chatml").tokenize(MESSAGES, NoImage(), max_length=64, record_id="r1")


def test_llava_to_messages():
    conversations = [{"from": "system", "value": "S"}, {"from": "human", "value": "<image>\nQ"},
                     {"from": "gpt", "value": "A"}]
    assert llava_to_messages(conversations) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "<image>\nQ"},
        {"role": "assistant", "content": "A"}]
    with pytest.raises(ValueError, match="rec-3.*turn 1.*'bot'"):
        llava_to_messages([{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}], record_id="rec-3")
    with pytest.raises(ValueError, match="rec-4.*alternate"):
        llava_to_messages([{"from": "gpt", "value": "A"}], record_id="rec-4")
    with pytest.raises(ValueError, match="turn 0 needs 'from' and 'value'"):
        llava_to_messages([{"value": "Q"}])


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("vicuna")
