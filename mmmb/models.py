"""Model adapters for MMMB: a small protocol the evaluator talks to, and the Parrot implementation.

Prompts passed to an adapter are plain question text (:func:`mmmb.prompts.format_question`); the adapter adds
its own chat template and image placeholder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn as nn
from PIL import Image


class MCQModel(Protocol):
    """What the MMMB evaluator needs from a model."""

    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[str]:
        """Greedy answers, one string per prompt."""
        ...

    def option_logprobs(self, prompts: list[str], images: list[Image.Image], letters: Sequence[str]) -> torch.Tensor:
        """Log-probability of each option letter as the next token after the prompt: (B, len(letters))."""
        ...

    # Optional: ``settings_id(mode) -> str``, what besides the weights shapes the answers in ``mode`` (chat
    # template, processor, generation length). The evaluator ties its prediction cache to it.


def weights_fingerprint(module: nn.Module, samples: int = 16) -> str:
    """An identity of `module`'s weights: sha1 over every parameter's name, shape, dtype and `samples` evenly spaced
    values. Equal weights give equal fingerprints; a training step changes (nearly) every value of what it trains,
    so a retrained model saved under the same name gets another one. Reads a few values per tensor, not all."""
    digest = hashlib.sha1()
    for name, param in module.named_parameters():
        flat = param.detach().reshape(-1)  # (numel,)
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        if flat.numel():
            positions = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
            digest.update(flat[positions].double().cpu().numpy().tobytes())
    return digest.hexdigest()


class ParrotMCQModel:
    """:class:`MCQModel` over a saved Parrot checkpoint or training output (with its adapters, if any).

    `weights_id` (see `weights_fingerprint`) goes into `EvalConfig.model_weights`, and `settings_id(mode)` (processor
    and chat template settings, plus `max_new_tokens` when generating) is recorded with every cached prediction, so
    that the evaluator never reuses cached predictions of other weights saved under the same name, nor answers
    generated with another template or length limit."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_new_tokens: int = 16):
        from parrot.train.export import load_trained

        model, self.processor = load_trained(model_dir)
        self.model = model.to(device=device, dtype=dtype).eval() if dtype else model.to(device).eval()
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
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
            settings |= {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return json.dumps(settings, sort_keys=True, default=str)

    @torch.inference_mode()
    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[str]:
        new_tokens = self.model.generate(**self._batch(prompts, images), max_new_tokens=self.max_new_tokens,
                                         do_sample=False)  # (B, n_new)
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
