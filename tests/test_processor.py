"""ParrotProcessor on the tiny recipe: prompts, padding, placeholder and length checks, persistence."""

import pytest
import torch
from PIL import Image

from parrot.data.processor import ParrotProcessor, ProcessorSettings, PromptError
from parrot.data.tokenizer import build_tiny_tokenizer

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def processor():
    settings = ProcessorSettings(image_size=32, image_mean=MEAN, image_std=STD, num_image_tokens=17,
                                 model_max_length=80)
    return ParrotProcessor(build_tiny_tokenizer(), settings)


def test_prompt_is_chatml_with_image_first(processor):
    prompt = processor.build_prompt("Qual é a cor do círculo?")
    assert prompt.endswith("<|im_start|>user\n<image>\nQual é a cor do círculo?<|im_end|>\n<|im_start|>assistant\n")
    history = [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "hello"}]
    follow_up = processor.build_prompt("и ещё?", with_image=False, history=history)
    assert follow_up.count("<image>") == 1 and "hello<|im_end|>" in follow_up


def test_batch_left_padding_and_pixels(processor):
    image = Image.new("RGB", (20, 10), (10, 200, 30))
    prompts = [processor.build_prompt("a"), processor.build_prompt("ما لون المربع الكبير؟")]
    batch = processor(prompts, [image, image], padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert mask[:, -1].all() and not mask[0, 0]  # left padded; the short prompt has padding in front
    assert (ids == processor.image_token_id).sum(1).tolist() == [1, 1]
    for row, prompt in zip(range(2), prompts):  # decoding the unpadded ids gives the prompt back
        assert processor.tokenizer.decode(ids[row][mask[row].bool()]) == prompt
    text_only = processor([processor.build_prompt("hello", with_image=False)], [None])
    assert "pixel_values" not in text_only


def test_placeholder_mismatch_and_overlong_prompt_name_the_prompt(processor):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="prompt 1 has 0 '<image>' placeholders but 1"):
        processor([processor.build_prompt("x"), processor.build_prompt("y", with_image=False)], [image, image])
    with pytest.raises(ValueError, match="prompt 0 has 1 '<image>' placeholders but 0"):
        processor([processor.build_prompt("x")], [None])
    long_question = " ".join(["circle"] * 60)
    with pytest.raises(ValueError, match="prompt 0 is .* over model_max_length=80"):
        processor([processor.build_prompt(long_question)], [image])


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = ParrotProcessor.from_pretrained(tmp_path)
    assert loaded.settings == processor.settings
    prompt = processor.build_prompt("Kaç tane yıldız var?")
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    a, b = processor([prompt], [image]), loaded([prompt], [image])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_settings_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="parrot_processor.json"):
        ParrotProcessor.from_pretrained(tmp_path)


def test_prompt_errors_carry_the_batch_position(processor):
    # the MMMB evaluator maps the position back to the item (language, index) it sent there
    image = Image.new("RGB", (8, 8))
    long_question = " ".join(["circle"] * 60)
    with pytest.raises(PromptError) as error:
        processor([processor.build_prompt("x"), processor.build_prompt(long_question)], [image, image])
    assert error.value.position == 1 and isinstance(error.value, ValueError)


def test_a_message_list_given_as_the_question_is_refused(processor):
    messages = processor.build_messages("What colour is the circle?")
    with pytest.raises(TypeError, match="question must be the user's text"):
        processor.build_prompt(messages)
