"""Smoke tests of the benchmark scripts at toy sizes: every reference must reproduce our output and gradients
(the scripts raise otherwise), the timing/ratio bookkeeping must be right, and JSON must be written.

    .venv/bin/python -m pytest -q benchmarks/test_benchmarks.py
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_merge, bench_mole, bench_parrot_moe, harness
from parrot.moe import fused

FAST = ["--warmup", "0", "--repeats", "2"]
INTERPRETED = fused.kernels is not None and fused.kernels.INTERPRETED


def test_parrot_moe_reference_matches_and_json(tmp_path):
    result = bench_parrot_moe.main(["--batch", "3", "--visual-tokens", "9", "--text-tokens", "6", "--hidden", "16",
                                    "--experts", "3", "--intermediate", "8", "--dtype", "float64",
                                    "--out", str(tmp_path), *FAST])
    assert result.checks[0].ok and result.checks[0].max_rel_err < 1e-12
    saved = json.loads((tmp_path / "parrot_moe.json").read_text())
    assert saved["sizes"]["batch"] == 3 and len(saved["timings"]) == 2
    assert all(len(t["times_ms"]) == 2 for t in saved["timings"].values())
    ratio = saved["ratios"][0]
    timings = saved["timings"]
    assert ratio["value"] == pytest.approx(timings[ratio["numerator"]]["median_ms"] / timings[ratio["denominator"]]["median_ms"])


def test_mole_references_match_for_every_router(tmp_path):
    result = bench_mole.main(["--tokens", "64", "--hidden", "32", "--rank", "4", "--experts", "4", "--dtype", "float64",
                              "--router-scale", "4", "--out", str(tmp_path), *FAST])
    # adapter: ours + masked loop + grouped; layer: ours + masked loop -> 5 checks per router, all against the
    # dense loop (every expert on every token).
    assert len(result.checks) == 5 * 4 and all(c.max_rel_err < 1e-10 for c in result.checks)
    assert set(result.extra["routing"]) == {"topk", "dynmole", "gwmoe", "mor"}
    assert result.extra["routing"]["topk"]["mean_active_experts"] == pytest.approx(2.0)
    assert (tmp_path / "mole.json").is_file()


@pytest.mark.skipif(not INTERPRETED, reason="the fused path on CPU needs TRITON_INTERPRET=1 (set by conftest)")
def test_mole_compiled_cases_time_the_fused_ops(tmp_path):
    """--compile: ours (the fused path, here through Triton's interpreter) and the floor under torch.compile, checked
    equal to uncompiled ours first; backend aot_eager keeps this test free of C++ compilation."""
    result = bench_mole.main(["--tokens", "64", "--hidden", "32", "--rank", "4", "--experts", "4", "--dtype", "float64",
                              "--routers", "dynmole", "--scopes", "adapter", "--fused", "always", "--no-candidate",
                              "--compile", "default", "--compile-backend", "aot_eager", "--out", str(tmp_path), *FAST])
    compiled_checks = [c for c in result.checks if "compiled" in c.name]
    assert len(compiled_checks) == 1 and compiled_checks[0].max_rel_err < 1e-10
    saved = json.loads((tmp_path / "mole.json").read_text())
    assert {"adapter floor: peft LoRA r=8 [compiled]", "adapter ours: dynmole [compiled]"} <= set(saved["timings"])
    assert any(r["name"] == "adapter dynmole: ours / floor [both compiled]" for r in saved["ratios"])


def test_merge_reference_matches_exactly():
    result = bench_merge.main(["--batch", "4", "--text-tokens", "12", "--visual-tokens", "5", "--hidden", "8", *FAST])
    assert result.checks[0].max_rel_err == 0.0


def test_naive_mole_loop_is_an_independent_reference():
    """The naive loop must not share the grouped executor: zeroing one expert's routing column changes only it."""
    torch.manual_seed(0)
    sizes = dict(tokens=16, hidden=8, experts=3, top_k=2, rank=2)
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    layer = bench_mole.make_layer("topk", sizes, x.float(), 1.0, 0.9).double()
    flat = x.reshape(-1, 8)
    weights = layer.router(flat).weights
    by_hand = sum(weights[:, e : e + 1] * (flat @ layer.experts.lora_A[e].t() @ layer.experts.lora_B[e].t())
                  * layer.experts.scaling for e in range(3))
    torch.testing.assert_close(bench_mole.dense_loop_delta(layer, x), by_hand)


def test_masked_mole_loop_matches_a_per_token_sum():
    """The masked loop (issue 8's reference b) against a per-token Python sum over each token's selected experts."""
    torch.manual_seed(1)
    sizes = dict(tokens=12, hidden=8, experts=4, top_k=2, rank=2)
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    for kind in ("topk", "dynmole"):
        layer = bench_mole.make_layer(kind, sizes, x.float(), 3.0, 0.9).double()
        flat = x.reshape(-1, 8)
        routing = layer.router(flat)
        ex = layer.experts
        rows = []
        for t in range(12):
            selected = [int(e) for e in routing.indices[t] if e >= 0]
            rows.append(sum(routing.weights[t, e] * ex.scaling * (ex.lora_B[e] @ (ex.lora_A[e] @ flat[t]))
                            for e in selected))
        torch.testing.assert_close(bench_mole.masked_loop_delta(layer, x), torch.stack(rows))


def test_check_same_rejects_a_wrong_result():
    ref = torch.randn(10)
    with pytest.raises(AssertionError, match="disagree on 'output'"):
        harness.check_same("demo", [ref + 0.1], [ref], torch.float32, ["output"])
    assert harness.check_same("demo", [ref.clone()], [ref], torch.float32).max_rel_err == 0.0


def test_timing_summary_and_ratio_direction():
    timings = {"fast": harness.Timing.of([1.0, 2.0, 3.0]), "slow": harness.Timing.of([10.0, 20.0, 30.0])}
    assert timings["fast"].median_ms == 2.0 and timings["fast"].min_ms == 1.0
    speedup = harness.Ratio("speedup", "slow", "fast", 5.0, "at_least").evaluate(timings)
    assert speedup.value == pytest.approx(10.0) and speedup.met
    overhead = harness.Ratio("overhead", "slow", "fast", 1.5, "at_most").evaluate(timings)
    assert not overhead.met


def test_run_all_writes_a_summary_plot_of_the_targeted_ratios(tmp_path):
    from benchmarks import run_all

    assert run_all.main(["--quick", "--only", "merge", "--out", str(tmp_path), "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (row,) = summary["ratios"]
    assert row["target_value"] == 5.0 and row["target"] == ">= 5"
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    untargeted = [dict(row, target=None, target_value=None)]
    assert run_all.plot_summary(untargeted, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
