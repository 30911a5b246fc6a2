"""Inference encodes chat prompts exactly as training does, with a real Qwen2-style byte-level BPE.

The project's tiny tokenizer uses GPT-2's pre-tokenisation regex, under which a ChatML prompt tokenises the same
whole or segment by segment, so it cannot show the problem. Qwen2's regex joins runs of newlines ("\\s*[\\r\\n]+"):
an earlier answer starting with "\\n" right after "<|im_start|>assistant\\n" becomes one "\\n\\n" token when the
rendered prompt is tokenised whole, but two "\\n" tokens in training, which tokenises segment by segment. Here the
training pipeline (`ConversationDataset`) is the reference for the ids the processor, the demo engine, the MMMB
adapter and the VLMEvalKit adapter give a model.
"""

import random

import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmmb.models import ParrotMCQModel
from parrot.data.datasets import ConversationDataset, SourcedRecord
from parrot.data.processor import ParrotProcessor
from parrot.model import ParrotForCausalLM
from parrot.data.templates import IGNORE_INDEX
from parrot.data.tokenizer import IM_END, IM_START, IMAGE_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from parrot.integrations import ParrotVLMEval
from parrot.serve.engine import ChatEngine, Conversation, Turn

from .conftest import save_tiny_parrot_for

# Qwen2's pre-tokenisation (its tokenizer.json: a Split with this regex, then ByteLevel without its own regex).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ("red blue green circle square star colour how many what is the answer".split()
         + "красный синий круг квадрат сколько цвет".split() + "红色 蓝色 圆形 方块 颜色 多少".split()
         + "أحمر أزرق دائرة مربع لون".split() + "kırmızı mavi daire kare renk".split()
         + "vermelho azul círculo quadrado cor".split())

# A chat whose first answer starts with "\n" (models often answer so); the prompt awaits the second answer.
U1, A1, U2, A2 = "What colour is the circle?", "\nRed. 红色。", "И квадрат?", "Синий."


def generated_lines(n: int, seed: int = 0) -> list[str]:
    """Multilingual lines with single and double newlines and runs of spaces, as chat text has."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        text = " ".join(words) + rng.choice([".", "?", "!", "。", ""])
        lines.append(rng.choice(["", "\n", "\n\n", "  "]) + text + rng.choice(["", "\n", "\n\n"]))
    return ["system\nuser\nassistant\n\nYou are a helpful assistant."] + lines


def qwen2_style_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE with Qwen2's pre-tokenisation and the special tokens of `build_tiny_tokenizer`."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(generated_lines(400), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=IM_END,
                                   extra_special_tokens=[IM_START, IMAGE_TOKEN], model_max_length=1024,
                                   padding_side="right", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Parrot (MoE on) saved with the Qwen2-style tokenizer."""
    return save_tiny_parrot_for(qwen2_style_tokenizer(), tmp_path_factory.mktemp("qwen2_style_parrot"))


@pytest.fixture(scope="module")
def processor(model_dir):
    return ParrotProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(path)
    return path


def training_prefix(processor, image_path, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels) that training gives the conversation `turns` (the image in the first user turn), cut where
    the last answer starts: what the model sees when asked for that answer."""
    conversations = []
    for i, (user, assistant) in enumerate(turns):
        user = f"{IMAGE_TOKEN}\n{user}" if i == 0 else user
        conversations += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    record = SourcedRecord({"id": "r0", "image": image_path.name, "conversations": conversations},
                           str(image_path.parent / "train.json"), 0, image_path.parent, "test")
    dataset = ConversationDataset([record], processor.tokenizer, processor.settings.template, 1024,
                                  processor.image_transform)
    ids, labels = dataset[0]["input_ids"].tolist(), dataset[0]["labels"].tolist()
    last_answer = max(i for i in range(len(labels))
                      if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))
    return ids[:last_answer], labels[:last_answer]


def unpadded_rows(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_whole_string_tokenisation_differs_from_training(processor, image_path):
    """The premise: with this tokenizer, tokenising the rendered prompt whole gives other ids than training."""
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{U1}"}, {"role": "assistant", "content": A1},
                {"role": "user", "content": U2}]
    whole = processor.tokenizer(processor.template.render(messages, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
    reference, _ = training_prefix(processor, image_path, [(U1, A1), (U2, A2)])
    assert whole != reference
    assert processor.tokenizer.decode(whole) == processor.tokenizer.decode(reference)  # same text, other ids
    legacy = processor([processor.template.render(messages, add_generation_prompt=True)], [image_path])
    assert unpadded_rows(legacy) == [whole]  # an already-formatted string is still tokenised whole


def test_processor_encodes_messages_as_training_does(processor, image_path):
    history = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{U1}"}, {"role": "assistant", "content": A1}]
    chats = [processor.build_messages(U2, with_image=False, history=history), processor.build_messages("a")]
    batch = processor(chats, [image_path, image_path], padding_side="left", return_labels=True)
    reference, reference_labels = training_prefix(processor, image_path, [(U1, A1), (U2, A2)])
    short, _ = training_prefix(processor, image_path, [("a", "b")])
    assert unpadded_rows(batch) == [reference, short]
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][1, 0]  # left padding kept
    assert batch["labels"][0].tolist() == reference_labels  # the first answer labelled as training labels it
    assert (batch["labels"][1] == IGNORE_INDEX).all()  # padding and a chat without earlier answers
    assert processor.encode(chats[0]) == (reference, [label != IGNORE_INDEX for label in reference_labels])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="prompt 0 is a string"):
        processor([processor.build_prompt("a")], [image_path], return_labels=True)


def test_engine_prompt_is_training_prefix(model_dir, processor, image_path):
    model = ParrotForCausalLM.from_pretrained(model_dir)
    engine = ChatEngine(model, processor)
    prepared = engine.prepare(Image.open(image_path), Conversation("k", (Turn(U1, A1),)), U2)
    reference, reference_labels = training_prefix(processor, image_path, [(U1, A1), (U2, A2)])
    assert prepared.batch["input_ids"][0].tolist() == reference
    assert prepared.labels[0].tolist() == reference_labels
    assert "labels" not in prepared.batch


QUESTIONS = ("What colour is the circle?\nA. red\nB. blue\nAnswer with the option's letter.", "圆形是什么颜色?")


def generated_inputs(model, monkeypatch) -> list[dict]:
    """Replace `model.generate` by a recorder of the tensors it is given."""
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return torch.zeros(kwargs["input_ids"].shape[0], 1, dtype=torch.long)

    monkeypatch.setattr(model, "generate", record)
    return calls


def test_mmmb_adapter_prompts_are_training_prefixes(model_dir, image_path, monkeypatch):
    adapter = ParrotMCQModel(model_dir, max_new_tokens=2)
    calls = generated_inputs(adapter.model, monkeypatch)
    adapter.generate(list(QUESTIONS), [Image.open(image_path)] * 2)
    expected = [training_prefix(adapter.processor, image_path, [(q, "A")])[0] for q in QUESTIONS]
    assert unpadded_rows(calls[0]) == expected
    assert calls[0]["attention_mask"][:, -1].all()  # left padded: the next token follows every prompt


def test_vlmeval_adapter_prompt_is_training_prefix(model_dir, image_path, monkeypatch):
    adapter = ParrotVLMEval(str(model_dir), device="cpu", max_new_tokens=2)
    calls = generated_inputs(adapter.model, monkeypatch)
    adapter.generate([{"type": "image", "value": str(image_path)}, {"type": "text", "value": QUESTIONS[0]}])
    assert unpadded_rows(calls[0]) == [training_prefix(adapter.processor, image_path, [(QUESTIONS[0], "A")])[0]]
