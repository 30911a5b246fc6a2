"""Compile the fused MoLE Triton kernels for a GPU architecture without a GPU (Triton's bundled compiler).

    python scripts/compile_fused_kernels.py [--arch 90] [--dtypes float32 bfloat16]

Every router kind, with the option branches alternated (renormalisation, uniform broadcast, z-loss, padding
mask, loss gradients), in each dtype. Catches what Triton's interpreter (the CPU tests) cannot: code that the
compiler rejects. tests/test_fused_mole.py runs it for sm_90. Needs TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import argparse
import time

import torch

from parrot.moe.experts import LoRAExperts
from parrot.moe.fused import build_plan, compile_kernels
from parrot.moe.routers import RouterConfig, build_router

CONFIGS = [
    RouterConfig(kind="topk"),
    RouterConfig(kind="topk", top_k=1, renormalize=False, z_loss_coef=0.01),
    RouterConfig(kind="gwmoe", gw_threshold=1.0),
    RouterConfig(kind="gwmoe", gw_threshold=1.0, gw_broadcast_weights="uniform", gw_normalize_entropy=True),
    RouterConfig(kind="dynmole"),
    RouterConfig(kind="dynmole", renormalize=True, z_loss_coef=0.01),
    RouterConfig(kind="mor"),
    RouterConfig(kind="mor", num_routers=2, renormalize=False, z_loss_coef=0.01),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (80 = A100, 90 = H100)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    for dtype_name in args.dtypes:
        for i, config in enumerate(CONFIGS):
            experts = LoRAExperts(args.experts, 64, 64, args.rank, alpha=2.0 * args.rank)
            plan = build_plan(build_router(config, 64, args.experts), experts)
            start = time.perf_counter()
            names = compile_kernels(plan, getattr(torch, dtype_name), args.arch, masked=i % 2 == 0,
                                    loss_grads=i % 4 < 2)
            print(f"sm_{args.arch} {dtype_name} {config.kind} #{i}: {', '.join(names)} compiled in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
