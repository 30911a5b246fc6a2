"""Model adapters for MMMB: a small protocol the evaluator talks to, and the Parrot implementation.

Prompts passed to an adapter are plain question text (:func:`mmmb.prompts.format_question`); the adapter adds
its own chat template and image placeholder.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn as nn
from PIL import Image

from parrot.data.templates import reserved_prompt_texts


class MCQModel(Protocol):
    """What the MMMB evaluator needs from a model.

    ``generate`` (generation mode) or ``option_logprobs`` (likelihood mode), plus ``settings_id`` and
    ``reserved_texts``, which the evaluator calls in every mode: an adapter that lacks them is refused before any
    inference. An adapter that subclasses ``MCQModel`` inherits their documented defaults."""

    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[str]:
        """Greedy answers, one string per prompt."""
        ...

    def option_logprobs(self, prompts: list[str], images: list[Image.Image], letters: Sequence[str]) -> torch.Tensor:
        """Log-probability of each option letter as the next token after the prompt: (B, len(letters))."""
        ...

    def settings_id(self, mode: str) -> str:
        """What besides the weights shapes the answers in ``mode`` (chat template, processor, generation length),
        as stable text; the evaluator ties its prediction cache to it. Default: "" (nothing besides the weights,
        e.g. a stub whose answers depend on the prompt alone)."""
        return ""

    def reserved_texts(self) -> tuple[str, ...]:
        """Texts this adapter's tokenizer reads as control tokens wherever they appear (chat scaffolding such as
        "<|im_end|>", end of text, the image placeholder). The evaluator refuses an item whose prompt text spells
        one, as training skips such records: tokenised, it would become the control token itself. Default: ()
        (an adapter whose prompts have no such texts, e.g. one that never tokenises)."""
        return ()


# Whole tensors are hashed in slices of this many bytes: a slice of a GPU tensor is copied to the CPU at a time,
# so hashing never holds a second copy of a large tensor.
_HASH_CHUNK_BYTES = 1 << 24


def weights_fingerprint(module: nn.Module) -> str:
    """An identity of `module`'s weights: blake2b-256 over every parameter's name, shape, dtype and every byte of
    its values, in `named_parameters` order (tied weights once), then the buffers likewise (a calibrated GW-MoE
    threshold is a buffer and decides routing). Two models that differ in any single bit of any
    parameter (a LoRA merge, a few fine-tuned rows, a -0.0 for a 0.0) get different fingerprints; so does the same
    model in another dtype, whose answers differ too.

    Cost: the bytes are copied to the CPU in 16 MiB slices and hashed there on one core. Measured 760-780 MB/s
    (a 1.07 GB bf16 model in 1.4 s, on a shared 2-core Xeon, CPU weights); so ~20 s for a 7B model in bf16
    (15 GB), once per load, against an hour or more to evaluate it on MMMB (the device-to-host copy of GPU weights,
    not measured, adds little next to the hashing). A sample of values per tensor would be cheaper, but two
    checkpoints differing elsewhere would share cached predictions: wrong results."""
    digest = hashlib.blake2b(digest_size=32)
    for name, param in itertools.chain(module.named_parameters(), module.named_buffers()):
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        # Raw bytes: bf16 (which numpy lacks) hashes like any other dtype; the names above separate tensors.
        flat = param.detach().contiguous().reshape(-1).view(torch.uint8)  # (numel * element_size,)
        for start in range(0, flat.numel(), _HASH_CHUNK_BYTES):
            digest.update(flat[start:start + _HASH_CHUNK_BYTES].cpu().numpy())
    return "blake2b-256:" + digest.hexdigest()


class ParrotMCQModel(MCQModel):
    """:class:`MCQModel` over a saved Parrot checkpoint or training output (with its adapters, if any).

    `weights_id` (see `weights_fingerprint`) goes into `EvalConfig.model_weights`, and `settings_id(mode)` (processor
    and chat template settings, plus `max_new_tokens` when generating) is recorded with every cached prediction, so
    that the evaluator never reuses cached predictions of other weights saved under the same name, nor answers
    generated with another template or length limit. `reserved_texts()` are the tokenizer's control-token texts and
    the image placeholder, which the evaluator refuses in an item's text."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_new_tokens: int = 16):
        from parrot.train.export import load_trained

        model, self.processor = load_trained(model_dir)
        self.model = model.to(device=device, dtype=dtype).eval() if dtype else model.to(device).eval()
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        # Answers end at the model's eos or at the chat template's end of an answer (<|im_end|> where eos differs)
        self.end_ids = self.processor.end_of_answer_ids(self.model.generation_config.eos_token_id)
        self.weights_id = weights_fingerprint(self.model)
        self._letter_token_ids: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def _batch(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Left-padded batch; each question becomes one user turn encoded segment-wise, as training encodes it."""
        chats = [self.processor.build_messages(prompt) for prompt in prompts]
        batch = self.processor(chats, images, padding_side="left")
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def settings_id(self, mode: str) -> str:
        """What besides the weights decides the answers in `mode` ("generate" or "likelihood"), as stable text."""
        settings: dict[str, object] = {"processor": asdict(self.processor.settings)}
        if mode == "generate":
            settings |= {"max_new_tokens": self.max_new_tokens, "do_sample": False, "end_ids": self.end_ids}
        return json.dumps(settings, sort_keys=True, default=str)

    def reserved_texts(self) -> tuple[str, ...]:
        """The tokenizer's control-token texts (as training's `control_token_strings`) and the image placeholder."""
        return reserved_prompt_texts(self.processor.tokenizer)

    @torch.inference_mode()
    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[str]:
        new_tokens = self.model.generate(**self._batch(prompts, images), max_new_tokens=self.max_new_tokens,
                                         do_sample=False, eos_token_id=self.end_ids or None)  # (B, n_new)
        return self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def letter_token_ids(self, letters: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids that spell each letter as one token, with and without a leading space (tokenizers differ
        in which one follows the assistant header): ids (L, V_max) and a validity mask (L, V_max)."""
        key = tuple(letters)
        if key not in self._letter_token_ids:
            tokenizer = self.processor.tokenizer
            variants = []
            for letter in letters:
                ids = []
                for spelling in (letter, " " + letter):
                    encoded = tokenizer.encode(spelling, add_special_tokens=False)
                    if len(encoded) == 1 and tokenizer.decode(encoded).strip() == letter and encoded[0] not in ids:
                        ids.append(encoded[0])
                if not ids:
                    raise ValueError(f"the tokenizer has no single token for option letter {letter!r}; "
                                     "use --mode generate")
                variants.append(ids)
            width = max(map(len, variants))
            ids = torch.tensor([v + [v[0]] * (width - len(v)) for v in variants])
            mask = torch.tensor([[True] * len(v) + [False] * (width - len(v)) for v in variants])
            self._letter_token_ids[key] = (ids, mask)
        return self._letter_token_ids[key]

    @torch.inference_mode()
    def option_logprobs(self, prompts: list[str], images: list[Image.Image], letters: Sequence[str]) -> torch.Tensor:
        logits = self.model(**self._batch(prompts, images)).logits[:, -1, :]  # (B, V); left padding → last = next
        logprobs = logits.float().log_softmax(dim=-1).cpu()
        ids, mask = self.letter_token_ids(letters)  # (L, K)
        per_variant = logprobs[:, ids]  # (B, L, K)
        per_variant = per_variant.masked_fill(~mask, float("-inf"))
        return per_variant.logsumexp(dim=-1)  # (B, L): P(letter) summed over its spellings
