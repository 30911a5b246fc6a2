import pytest
from transformers import AutoTokenizer

from parrot.data.synthetic import LANGUAGES, corpus_texts
from parrot.data.templates import get_template
from parrot.data.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(vocab_size=2000, seed=0)


def test_special_tokens(tokenizer):
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                  "<image>")}
    assert len(set(ids.values())) == 4
    assert all(i is not None and i < len(tokenizer) for i in ids.values())
    assert len(tokenizer) == 2000


@pytest.mark.parametrize("text", ["<image>\nWhat colour is the circle?", "图中<image>有几个圆形？",
                                  "abc<image>def", "<image><image>", "Сколько<image>кругов"])
def test_image_token_is_atomic(tokenizer, text):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == text.count("<image>")
    assert tokenizer.decode(ids) == text
    without = tokenizer(text.replace("<image>", ""), add_special_tokens=False)["input_ids"]
    assert image_id not in without


def test_all_languages_compress_and_round_trip(tokenizer):
    held_out = corpus_texts(seed=123, n=120)  # another seed: not the training texts
    for i, lang in enumerate(LANGUAGES):
        texts = held_out[i::len(LANGUAGES)]
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        n_tokens = sum(len(x) for x in ids)
        # Byte fallback would give one token per byte; trained merges must do far better in every language.
        assert n_tokens < 0.35 * n_bytes, (lang, n_tokens, n_bytes)
        assert [tokenizer.decode(x) for x in ids] == texts


def test_deterministic_for_seed(tokenizer):
    again = build_tiny_tokenizer(vocab_size=2000, seed=0)
    assert again.get_vocab() == tokenizer.get_vocab()
    other = build_tiny_tokenizer(vocab_size=2000, seed=1)
    text = "Quantas estrelas amarelas há na imagem? Сколько красных фигур?"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert other.get_vocab() != tokenizer.get_vocab()


def test_save_and_reload_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = corpus_texts(seed=7, n=12) + ["<image>\nhi<|im_end|>"]
    for text in texts:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.convert_tokens_to_ids("<image>") == tokenizer.convert_tokens_to_ids("<image>")
    assert loaded.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("generation", [False, True])
def test_chat_template_matches_chatml_template(tokenizer, generation):
    conversations = [
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "Red"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\n图中有几个圆形？"},
         {"role": "assistant", "content": "两个"}, {"role": "user", "content": "背景是什么颜色？"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    for messages in conversations:
        ours = get_template("chatml").render(messages, add_generation_prompt=generation)
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) == ours
