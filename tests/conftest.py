import os

# The fused MoLE kernels (Triton) run on CPU tensors through Triton's interpreter; it must be on before Triton is
# imported. An explicit TRITON_INTERPRET=0 (a GPU check) compiles them instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import LogitsProcessor

from parrot.model import ParrotConfig

IMAGE_TOKEN_ID = 5


def tiny_parrot_config(vision: str = "hf_clip", text: str = "qwen2", **overrides) -> ParrotConfig:
    """A model that builds in milliseconds: 2-layer LM (hidden 32) and 2-layer ViT on 32x32 images (17 tokens)."""
    text_config = dict(
        model_type=text, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    if vision == "hf_clip":
        vision_config = dict(
            model_type="clip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, image_size=32, patch_size=8,
        )
    else:
        vision_config = dict(
            model_type="parrot_open_clip_vision", embed_dim=16,
            vision_cfg=dict(width=24, layers=2, patch_size=8, image_size=32, head_width=6),
        )
    settings = dict(image_token_id=IMAGE_TOKEN_ID, use_moe=True, moe_num_experts=3, moe_intermediate_size=40)
    settings.update(overrides)
    return ParrotConfig(text_config=text_config, vision_config=vision_config, **settings)


def save_tiny_parrot_for(tokenizer, directory, **overrides):
    """A tiny random Parrot sized for `tokenizer` (qwen2 LM, CLIP ViT on 32x32 images), saved with its processor
    into `directory` as `load_pretrained` / `ParrotMCQModel` read it. Returns the directory."""
    from parrot.data.processor import IMAGE_TOKEN, ParrotProcessor
    from parrot.model import ParrotForCausalLM

    config = tiny_parrot_config(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **overrides)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.max_position_embeddings = 1024
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = ParrotForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    ParrotProcessor.for_model(tokenizer, config, model_max_length=1024).save_pretrained(directory)
    return directory


class ScriptedTokens(LogitsProcessor):
    """Forces the i-th new token to be script[i] (a Parrot model's generate() gets the prompt as embeddings, so
    input_ids holds only the new tokens)."""

    def __init__(self, script: list[int]):
        self.script = script

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[min(input_ids.shape[1], len(self.script) - 1)]] = 0.0
        return forced


def pytest_configure(config):
    # The test models are tiny: one intra-op thread avoids thread start-up and oversubscription costs
    # (many times faster on the 2-core CI machine). Subprocess tests (torchrun, servers) are unaffected.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class GateRecorder:
    """Records the outputs of the given router gates (pre-softmax logits, (B*S, E)), in call order, inside `with`:
    what transformers' `load_balancing_loss_func` takes, as the references of the pooled balance tests."""

    def __init__(self, gates):
        self.gates = list(gates)
        self.logits: list[torch.Tensor] = []

    def __enter__(self):
        self.handles = [g.register_forward_hook(lambda m, a, out: self.logits.append(out)) for g in self.gates]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def padded_batch(padding: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """Three 7-token rows of ids from [3, vocab_size): padding "none" (no attention mask), "left" or "right"
    (rows padded by different amounts, pad id 0)."""
    torch.manual_seed(3)
    ids = torch.randint(3, vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[0, -2:] = 0
        mask[2, -4:] = 0
    if padding == "none":
        return {"input_ids": ids}
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
