"""Run every benchmark with one command; all JSON lands in one folder, plus `summary.json` and `summary.md`.

    python -m benchmarks.run_all                                  # CPU, float32, the issue's sizes
    python -m benchmarks.run_all --device cuda                    # GPU: float32 and bfloat16
    python -m benchmarks.run_all --quick --out results/bench-quick   # small sizes, a smoke run

Results go to `--out` (default `results/benchmarks/<device>`), one subfolder per dtype; `summary.png` draws every
targeted ratio against its target. A benchmark that
fails (a reference mismatch, an import error) is recorded in the summary and the others still run; the exit
status is 1 if any failed. Time at the issue's sizes: about 2 minutes on 2 CPU cores, about 1 on an H100 (2026-11-26).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = ("parrot_moe", "mole", "merge", "train_eval")


def _module(name: str):
    # Imported one at a time, so that a benchmark whose dependencies are missing fails alone.
    return importlib.import_module(f".bench_{name}", __package__)


def summary_rows(result) -> list[dict]:
    return [{"benchmark": result.benchmark, "ratio": r.name, "value": round(r.value, 3),
             "value_of_minimums": round(r.value_of_minimums, 3),
             "target": None if r.target is None else (">= " if r.direction == "at_least" else "<= ") + f"{r.target:g}",
             "target_value": r.target, "met": r.met} for r in result.ratios]


def plot_summary(rows: list[dict], path: Path) -> Path | None:
    """Every ratio that has a target, as a dot at its value joined to its target (log scale): green met, red
    missed. Returns the image path (None: no targeted ratio)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    targeted = [row for row in rows if row["target_value"] is not None]
    if not targeted:
        return None
    fig = Figure(figsize=(11, 1.5 + 0.22 * len(targeted)))
    ax = fig.add_subplot()
    y = list(range(len(targeted)))
    values, targets = [row["value"] for row in targeted], [row["target_value"] for row in targeted]
    colors = ["tab:green" if row["met"] else "tab:red" for row in targeted]
    ax.hlines(y, targets, values, colors=colors, linewidth=2)
    ax.scatter(values, y, c=colors, s=25, zorder=3, label="measured (ratio of medians)")
    ax.scatter(targets, y, marker="|", s=120, color="black", zorder=3, label="target")
    ax.set_yticks(y, [f"{row['dtype']} {row['benchmark']}: {row['ratio']} ({row['target']})" for row in targeted],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ratio (speedups: target >= ; cost relative to a floor: target <=)")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def to_markdown(rows: list[dict], failures: dict[str, str], header: str) -> str:
    lines = [header, "", "| dtype | benchmark | ratio | median ratio | ratio of minimums | target | met |",
             "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for row in rows:
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['dtype']} | {row['benchmark']} | {row['ratio']} | {row['value']:.2f}x | "
                     f"{row['value_of_minimums']:.2f}x | {row['target'] or ''} | {met} |")
    for name, error in failures.items():
        lines.append(f"\nFAILED {name}: {error}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float32 on CPU; float32 and bfloat16 on CUDA")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    dtypes = args.dtypes or (["float32", "bfloat16"] if args.device.startswith("cuda") else ["float32"])
    out = args.out or Path("results") / "benchmarks" / args.device.replace(":", "")

    rows, failures, started = [], {}, time.perf_counter()
    for dtype in dtypes:
        for name in args.only:
            flags = ["--device", args.device, "--dtype", dtype, "--out", str(out / dtype)]
            flags += ["--quick"] * args.quick + ["--profile"] * args.profile
            flags += ["--threads", str(args.threads)] if args.threads is not None else []
            print(f"\n##### {name} [{dtype}] {' '.join(flags)}", flush=True)
            t0 = time.perf_counter()
            try:
                result = _module(name).main(flags)
            except Exception as err:  # keep going: one broken benchmark must not hide the others' numbers
                traceback.print_exc()
                failures[f"{name}[{dtype}]"] = f"{type(err).__name__}: {err}"
                continue
            finally:
                print(f"##### {name} [{dtype}] took {time.perf_counter() - t0:.1f} s", flush=True)
            rows += [dict(row, dtype=dtype) for row in summary_rows(result)]
            if args.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    elapsed = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Benchmarks on {args.device} ({', '.join(dtypes)}{', quick' if args.quick else ''}), {elapsed:.0f} s"
    (out / "summary.json").write_text(json.dumps({"device": args.device, "dtypes": dtypes, "quick": args.quick,
                                                  "seconds": round(elapsed, 1), "ratios": rows,
                                                  "failures": failures}, indent=2))
    markdown = to_markdown(rows, failures, header)
    (out / "summary.md").write_text(markdown)
    plot_summary(rows, out / "summary.png")
    print("\n" + markdown)
    print(f"results in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
