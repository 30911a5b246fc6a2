"""CUDA smoke check of the model on a GPU machine: CPU vs CUDA logits, bf16 generate, MoLE on CUDA.

    python scripts/cuda_check.py          # prints one line per check, exits 1 on a failure
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

from parrot.model.builder import build_tiny
from parrot.moe import MoLEConfig, RouterConfig, collect_router_outputs, inject_mole


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)  # only --help: nothing to set
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    failures = 0
    model, processor = build_tiny(use_moe=True)
    model.eval()
    images = [Image.new("RGB", (48, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (20, 40, 220))]
    prompts = [processor.build_messages("What colour is the shape?"), processor.build_messages("Какого цвета круг?")]
    batch = processor(prompts, images, padding_side="left")
    with torch.no_grad():
        cpu = model(**batch).logits
        gpu_model = model.to("cuda")
        gpu_batch = {k: v.to("cuda") for k, v in batch.items()}
        gpu = gpu_model(**gpu_batch).logits.float().cpu()
    err = (cpu - gpu).abs().max().item()
    ok = err < 1e-3
    failures += not ok
    print(f"{'ok ' if ok else 'FAIL'} fp32 CPU vs CUDA logits: max abs diff {err:.2e}")

    bf16 = gpu_model.to(torch.bfloat16)
    new = bf16.generate(**gpu_batch, max_new_tokens=8, do_sample=True, top_p=0.9)
    ok = new.shape[0] == 2 and new.device.type == "cuda"
    failures += not ok
    print(f"{'ok ' if ok else 'FAIL'} bf16 CUDA generate (sampling): {tuple(new.shape)}")

    inject_mole(bf16.language_model, MoLEConfig(num_experts=4, rank=4, router=RouterConfig(kind="dynmole")))
    bf16.to("cuda")
    out = bf16(**gpu_batch, labels=gpu_batch["input_ids"].masked_fill(gpu_batch["attention_mask"] == 0, -100))
    out.loss.backward()
    routing = collect_router_outputs(bf16)
    ok = torch.isfinite(out.loss).item() and len(routing) > 0
    failures += not ok
    print(f"{'ok ' if ok else 'FAIL'} bf16 CUDA MoLE (DynMoLE) fwd+bwd: loss {out.loss.item():.3f}, {len(routing)} routed layers")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
