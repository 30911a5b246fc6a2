"""Smoke tests of the benchmark scripts at toy sizes: every reference must reproduce our output and gradients
(the scripts raise otherwise), the timing/ratio bookkeeping must be right, and JSON must be written.

    .venv/bin/python -m pytest -q benchmarks/test_benchmarks.py
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_merge, bench_mole, bench_parrot_moe, bench_train_eval, harness, run_all
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
    # Every parsed flag is recorded (Paths as strings), none of the parser's private defaults.
    assert saved["args"]["dtype"] == "float64" and saved["args"]["seed"] == 0 and saved["args"]["repeats"] == 2
    assert saved["args"]["out"] == str(tmp_path) and saved["args"]["visual_tokens"] == 9
    assert not any(name.startswith("_") for name in saved["args"])
    assert all(len(t["times_ms"]) == 2 for t in saved["timings"].values())
    ratio = saved["ratios"][0]
    timings = saved["timings"]
    assert ratio["value"] == pytest.approx(timings[ratio["numerator"]]["median_ms"] / timings[ratio["denominator"]]["median_ms"])


def test_mole_references_match_for_every_router(tmp_path):
    result = bench_mole.main(["--tokens", "64", "--hidden", "32", "--rank", "4", "--experts", "4", "--dtype", "float64",
                              "--router-scale", "4", "--seed", "3", "--out", str(tmp_path), *FAST])
    # adapter: ours + masked loop + grouped; layer: ours + masked loop -> 5 checks per router, all against the
    # dense loop (every expert on every token).
    assert len(result.checks) == 5 * 4 and all(c.max_rel_err < 1e-10 for c in result.checks)
    assert set(result.extra["routing"]) == {"topk", "dynmole", "gwmoe", "mor"}
    assert result.extra["routing"]["topk"]["mean_active_experts"] == pytest.approx(2.0)
    saved = json.loads((tmp_path / "mole.json").read_text())
    assert saved["args"]["router_scale"] == 4.0 and saved["args"]["seed"] == 3
    assert saved["args"]["gw_quantile"] == 0.9 and saved["args"]["scopes"] == ["adapter", "layer"]
    # The issue sets targets for the floor and the masked loop only: the dense loop's speedup has none, so the
    # summary neither counts nor draws it.
    dense = [r for r in result.ratios if "dense loop" in r.name]
    masked = [r for r in result.ratios if r.name.endswith(": speedup over masked loop")]
    assert len(dense) == 2 * 4 and all(r.target is None and r.met is None for r in dense)
    assert len(masked) == 2 * 4 and all(r.target == bench_mole.TARGET_VS_NAIVE and r.met is not None for r in masked)
    rows = [dict(row, dtype="float64") for row in run_all.summary_rows(result)]
    dense_rows = [row for row in rows if "dense loop" in row["ratio"]]
    assert all(row["target"] is None and row["met"] is None for row in dense_rows)
    table_rows = run_all.to_markdown(dense_rows, {}, "# t").splitlines()[4:]  # after title, blank, header, rule
    assert len(table_rows) == len(dense_rows) and all(line.endswith("|  |  |") for line in table_rows)  # no target/met
    # 4 experts x rank 4 > 32 / 8: LoRAExperts' auto picks the grouped executor at this size, and the JSON says so.
    assert saved["extra"]["ours_executor"] == {kind: "grouped" for kind in ("topk", "dynmole", "gwmoe", "mor")}
    assert any("'ours' ran: topk grouped" in note for note in saved["notes"])


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


def test_check_same_compares_integer_tensors_exactly():
    """Labels / masks / indices: one label off by 40 is within bfloat16's relative tolerance, but must fail."""
    labels = torch.tensor([-100, 900, 950, 1000])
    wrong = labels.clone()
    wrong[1] += 40
    assert harness.relative_error(wrong, labels) < harness.CHECK_TOLERANCE[torch.bfloat16]  # what a float check sees
    embeds = torch.randn(4)
    with pytest.raises(AssertionError, match=r"disagree on 'labels' \(an integer / bool tensor.*1 of 4 .* 940 vs 900"):
        harness.check_same("demo", [embeds, wrong], [embeds, labels], torch.bfloat16, ["embeds", "labels"])
    mask = torch.tensor([True, True, False])
    with pytest.raises(AssertionError, match="disagree on 'mask'"):
        harness.check_same("demo", [~mask], [mask], torch.float32, ["mask"])
    with pytest.raises(AssertionError, match="shape mismatch on 'mask'"):
        harness.check_same("demo", [mask[:2]], [mask], torch.float32, ["mask"])
    # Equal integer tensors pass (a bool mask equals its 0/1 long form); float tensors keep their tolerance.
    check = harness.check_same("demo", [embeds + 1e-4, labels.clone(), mask], [embeds, labels, mask.long()],
                               torch.bfloat16, ["embeds", "labels", "mask"])
    assert check.ok and 0 < check.max_rel_err < harness.CHECK_TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("bench", [bench_parrot_moe, bench_merge, bench_train_eval])
def test_cuda_graphs_flag_is_rejected_where_unsupported(bench):
    with pytest.raises(SystemExit, match="--cuda-graphs: this benchmark has no CUDA-graph cases"):
        bench.main(["--cuda-graphs", "--quick"])


def test_mole_rejects_cuda_graphs_with_a_graphing_compile_mode():
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(SystemExit, match=f"--cuda-graphs with --compile {mode}: that mode replays CUDA graphs"):
            bench_mole.main(["--cuda-graphs", "--compile", mode, "--quick"])
    # bench_mole supports --cuda-graphs itself: on a CPU it is refused for the device, not for the benchmark.
    with pytest.raises(SystemExit, match="--cuda-graphs needs --device cuda"):
        bench_mole.main(["--cuda-graphs", "--compile", "max-autotune-no-cudagraphs", "--quick"])


def test_train_eval_throughput_uses_the_tables_median(monkeypatch, tmp_path):
    """Items/s from the median the table reports (mean of the middle two for an even count), not the upper one."""
    monkeypatch.setattr(bench_train_eval, "time_cases", lambda cases, settings, label="": {
        name: [t * (i + 1) for t in (10.0, 60.0, 20.0, 30.0)] for i, name in enumerate(cases)})
    monkeypatch.setattr(bench_train_eval, "evaluate_mmmb", lambda *args, **kwargs: None)  # not what is tested
    result = bench_train_eval.main(["--quick", "--out", str(tmp_path)])
    generate, likelihood = list(result.timings)[2:]
    assert result.timings[generate].median_ms == 75.0  # (60 + 90) / 2; the upper middle would be 90
    throughput = result.extra["mmmb_throughput"]
    assert throughput["generate_items_per_s"] == round(4 / 75.0 * 1e3, 2)
    assert throughput["likelihood_items_per_s"] == round(4 / result.timings[likelihood].median_ms * 1e3, 2)


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
    targeted = [row for row in summary["ratios"] if row["target_value"] is not None]
    (row,) = targeted  # the unbind loop's ratio is reported without a target
    assert len(summary["ratios"]) == 2 and row["target_value"] == 5.0 and row["target"] == ">= 5"
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    untargeted = [dict(row, target=None, target_value=None)]
    assert run_all.plot_summary(untargeted, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
