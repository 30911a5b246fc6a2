"""Shared benchmark machinery: flags, interleaved timing, correctness checks, tables, JSON, profiles.

Every benchmark times several *cases* (ours and its references) in one process. After `warmup` calls of
each case, the `repeats` timed calls are interleaved (ours, ref, ours, ref, ...) so that load from other
processes on a shared machine hits every case alike. CPU times come from `time.perf_counter`; CUDA times
from CUDA events around one call, after a synchronize (so the GPU timeline includes launch gaps).
Results are medians with the inter-quartile range.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from parrot.fileio import non_negative_int, positive_int

logger = logging.getLogger("benchmarks")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest relative error (max |ours - ref| / max |ref|) accepted when checking ours against a reference.
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TF32_CHECK_TOLERANCE = 1e-2


@dataclass
class BenchSettings:
    device: torch.device
    dtype: torch.dtype
    warmup: int
    repeats: int
    out: Path | None
    profile: bool
    quick: bool
    seed: int
    cuda_graphs: bool = False
    tf32: bool = False
    args: dict = field(default_factory=dict)  # every parsed flag (JSON-ready): the run's full settings


def _jsonable(value: object) -> object:
    """An argparse value as JSON can hold it: Paths as strings, sequences as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def add_common_args(parser: argparse.ArgumentParser, warmup: tuple[int, int] = (1, 3),
                    repeats: tuple[int, int] = (5, 20), cuda_graphs: bool = False) -> None:
    """Flags every benchmark shares. `warmup` / `repeats` defaults are (CPU, CUDA): CPU calls are slow.

    `cuda_graphs`: whether the benchmark has CUDA-graph cases; where not, `--cuda-graphs` is still listed (the
    flags stay the same for every script) but `settings_from_args` rejects it instead of silently ignoring it.
    """
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help=f"untimed calls per case after the correctness check (default {warmup[0]} CPU, {warmup[1]} CUDA)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timed calls per case (default {repeats[0]} CPU, {repeats[1]} CUDA)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run, not a claim)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON results (and profiles)")
    parser.add_argument("--profile", action="store_true", help="also write a torch.profiler table per case")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA only: also time capturable cases as CUDA-graph replays (GPU work without launch "
                             "overhead)" + ("" if cuda_graphs else "; not supported by this benchmark (rejected)"))
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA float32 runs: allow TF32 tensor-core matmuls on both sides (what HF Trainer's "
                             "--tf32 sets); the equality checks then use a 1e-2 tolerance")
    parser.set_defaults(_default_warmup=warmup, _default_repeats=repeats, _supports_cuda_graphs=cuda_graphs)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    if args.cuda_graphs and not args._supports_cuda_graphs:  # before any other check: the flag is the problem
        raise SystemExit("--cuda-graphs: this benchmark has no CUDA-graph cases (only bench_mole times them)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build / machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_gpu = int(device.type == "cuda")
    default_warmup, default_repeats = args._default_warmup[on_gpu], args._default_repeats[on_gpu]
    if args.quick:
        default_warmup, default_repeats = 1, 3
    warmup = default_warmup if args.warmup is None else args.warmup
    repeats = default_repeats if args.repeats is None else args.repeats
    if warmup < 0 or repeats < 1:
        raise SystemExit(f"--warmup must be >= 0 and --repeats >= 1 (got {warmup}, {repeats})")
    torch.manual_seed(args.seed)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("--cuda-graphs needs --device cuda")
    if args.tf32:
        if device.type != "cuda":
            raise SystemExit("--tf32 needs --device cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # process-wide: the benchmark owns its process
    flags = {name: _jsonable(value) for name, value in vars(args).items() if not name.startswith("_")}
    return BenchSettings(device, DTYPES[args.dtype], warmup, repeats, args.out, args.profile, args.quick, args.seed,
                         args.cuda_graphs, args.tf32, flags)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_graphed(fn: Callable[[], object], warmup: int = 3) -> tuple[Callable[[], None], object]:
    """Capture one call of `fn` (forward and backward) in a CUDA graph; returns (its replay, the captured call's
    return value). The returned tensors live in the graph's memory: each replay overwrites them with its results,
    so after a replay they can be checked against a plain call of `fn`.

    Timing the replay measures the GPU work of `fn` without the host's per-kernel launch cost, on both sides
    of a comparison alike. `fn` must not synchronise with the host (no `.item()`, `nonzero`, `.tolist()`).
    Call it inside `on_side_stream()`: the tensors `fn` uses must come from the capturing stream, since autograd
    makes a leaf's stream wait for its gradient and the legacy default stream may not wait on a capture.
    """
    stream = torch.cuda.current_stream()
    if stream == torch.cuda.default_stream():
        raise RuntimeError("cuda_graphed must run inside on_side_stream() (capture needs a non-default stream)")
    for _ in range(warmup):  # allocator and autograd caches settle before capture
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outputs = fn()
    return graph.replay, outputs


def on_side_stream(device: torch.device):
    """Context running everything (tensor creation, warm-up, capture, timing) on one non-default CUDA stream."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of `fn` (CUDA events on a GPU, wall clock on a CPU)."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def time_cases(cases: dict[str, Callable[[], object]], settings: BenchSettings, label: str = "") -> dict[str, list[float]]:
    """Warm up every case, then time `repeats` interleaved rounds; returns {case: [ms, ...]}."""
    for fn in cases.values():
        for _ in range(settings.warmup):
            fn()
    synchronize(settings.device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in tqdm(range(settings.repeats), desc=f"timing {label}".strip(), leave=False):
        for name, fn in cases.items():
            times[name].append(time_once(fn, settings.device))
    return times


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    times_ms: list[float]

    @classmethod
    def of(cls, times: Sequence[float]) -> "Timing":
        ordered = sorted(times)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), q1, q3, ordered[0], [round(t, 4) for t in times])


@dataclass
class Ratio:
    """`numerator` median / `denominator` median, compared with `target` in direction `at_least` / `at_most`."""

    name: str
    numerator: str
    denominator: str
    target: float | None = None
    direction: str = "at_least"
    value: float = float("nan")  # ratio of medians (the reported number)
    value_of_minimums: float = float("nan")  # ratio of the fastest calls: less sensitive to a loaded machine
    met: bool | None = None

    def evaluate(self, timings: dict[str, Timing]) -> "Ratio":
        self.value = timings[self.numerator].median_ms / timings[self.denominator].median_ms
        self.value_of_minimums = timings[self.numerator].min_ms / timings[self.denominator].min_ms
        if self.target is not None:
            self.met = self.value >= self.target if self.direction == "at_least" else self.value <= self.target
        return self

    def describe(self) -> str:
        text = f"{self.name}: {self.value:.2f}x (of minimums {self.value_of_minimums:.2f}x)"
        if self.target is None:
            return text
        sign = ">=" if self.direction == "at_least" else "<="
        return f"{text}, target {sign} {self.target:g}x: {'met' if self.met else 'MISSED'}"


@dataclass
class Check:
    name: str
    max_rel_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| in float64 (0 when both are all zeros)."""
    if ours.shape != ref.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def check_same(name: str, ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], dtype: torch.dtype,
               labels: Sequence[str] | None = None) -> Check:
    """Compare tensors pairwise (output, then gradients); raise if any differs beyond the dtype's tolerance.

    Integer and bool tensors (attention masks, labels, indices) must be equal exactly: a float tolerance would let
    a label or index be off by a lot (by 40 at bfloat16's 5e-2 on values around 1000).
    """
    if len(ours) != len(ref):
        raise AssertionError(f"{name}: {len(ours)} tensors from ours vs {len(ref)} from the reference")
    labels = list(labels) if labels is not None else [str(i) for i in range(len(ours))]
    errors = {}
    for label, a, b in zip(labels, ours, ref):
        if a.is_floating_point() and b.is_floating_point():
            errors[label] = relative_error(a, b)
            continue
        if a.shape != b.shape:
            raise AssertionError(f"{name}: shape mismatch on {label!r}: ours {tuple(a.shape)} vs reference "
                                 f"{tuple(b.shape)}")
        differ = (a.detach() != b.detach()).nonzero()
        if len(differ):
            at = tuple(differ[0].tolist())
            raise AssertionError(
                f"{name}: ours and the reference disagree on {label!r} (an integer / bool tensor, compared exactly): "
                f"{len(differ)} of {a.numel()} elements differ, first at {at}: {a[at].item()} vs {b[at].item()}")
        errors[label] = 0.0
    tolerance = CHECK_TOLERANCE[dtype]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:  # --tf32: 10-bit mantissa products
        tolerance = TF32_CHECK_TOLERANCE
    worst = max(errors, key=errors.get)
    check = Check(name, errors[worst], tolerance)
    if not check.ok:
        raise AssertionError(
            f"{name}: ours and the reference disagree on {worst!r} (relative error {errors[worst]:.3g} > "
            f"{tolerance:g}); all errors: { {k: f'{v:.2g}' for k, v in errors.items()} }"
        )
    return check


def environment(settings: BenchSettings) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(settings.device),
        "dtype": str(settings.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "quick": settings.quick,
        "tf32": settings.tf32,
    }
    if settings.device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(settings.device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def profile_cases(cases: dict[str, Callable[[], object]], settings: BenchSettings, bench: str, rows: int = 20) -> dict[str, str]:
    """Run each case twice under torch.profiler; print and write the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if settings.device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if settings.device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, fn in cases.items():
        fn()
        synchronize(settings.device)
        with profile(activities=activities) as prof:
            for _ in range(2):
                fn()
            synchronize(settings.device)
        table = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
        tables[name] = table
        print(f"\n--- profile {bench} / {name} (2 calls) ---\n{table}")
        if settings.out is not None:
            settings.out.mkdir(parents=True, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            (settings.out / f"{bench}__{safe}__profile.txt").write_text(table)
    return tables


def format_table(title: str, timings: dict[str, Timing], baseline: str) -> str:
    width = max(len(name) for name in timings) + 2
    lines = [title, f"{'case':<{width}}{'median ms':>12}{'IQR ms':>12}{'min ms':>12}{'x ours':>10}"]
    base = timings[baseline].median_ms
    for name, t in timings.items():
        lines.append(f"{name:<{width}}{t.median_ms:>12.3f}{t.q3_ms - t.q1_ms:>12.3f}{t.min_ms:>12.3f}"
                     f"{t.median_ms / base:>10.2f}")
    return "\n".join(lines)


@dataclass
class BenchResult:
    benchmark: str
    sizes: dict
    environment: dict
    timings: dict[str, Timing]
    ratios: list[Ratio]
    checks: list[Check]
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)  # the parsed flags (BenchSettings.args)

    def to_json(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "args": self.args,
            "sizes": self.sizes,
            "environment": self.environment,
            "timings": {k: asdict(v) for k, v in self.timings.items()},
            "ratios": [asdict(r) for r in self.ratios],
            "checks": [dict(asdict(c), ok=c.ok) for c in self.checks],
            "notes": self.notes,
            "extra": self.extra,
        }


def finish(benchmark: str, sizes: dict, times: dict[str, list[float]], ratios: list[Ratio], checks: list[Check],
           settings: BenchSettings, baseline: str, notes: Sequence[str] = (), extra: dict | None = None) -> BenchResult:
    """Turn raw times into medians and ratios, print the table, write `<out>/<benchmark>.json` (with every parsed
    flag under "args", so the JSON alone says how the run was made: seed, router settings, --compile, ...)."""
    timings = {name: Timing.of(t) for name, t in times.items()}
    ratios = [r.evaluate(timings) for r in ratios]
    env = environment(settings)
    size_text = " ".join(f"{k}={v}" for k, v in sizes.items())
    title = f"== {benchmark} ({env['device']} {env['device_name']}, {env['dtype']}, threads={env['threads']}) {size_text}"
    print(format_table(title, timings, baseline))
    for ratio in ratios:
        print("  " + ratio.describe())
    for check in checks:
        print(f"  check {check.name}: max relative error {check.max_rel_err:.2e} (tol {check.tolerance:g})")
    result = BenchResult(benchmark, sizes, env, timings, ratios, checks, list(notes), extra or {}, settings.args)
    if settings.out is not None:
        settings.out.mkdir(parents=True, exist_ok=True)
        path = settings.out / f"{benchmark}.json"
        path.write_text(json.dumps(result.to_json(), indent=2))
        logger.info("wrote %s", path)
    return result


def grads_of(output: torch.Tensor, inputs: Sequence[torch.Tensor], grad_output: torch.Tensor) -> list[torch.Tensor]:
    """Forward output plus d(output . grad_output)/d(inputs): what a fwd+bwd step computes, without touching .grad."""
    grads = torch.autograd.grad(output, list(inputs), grad_output, allow_unused=True)
    return [output] + [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs)]
