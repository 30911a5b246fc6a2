"""Router Lens + CEFT: find and tune the context-faithful experts of an MoE LLM.

Bai et al., 2025, "Understanding and Leveraging the Expert Specialization of Context Faithfulness in
Mixture-of-Experts LLMs" (arXiv 2508.19594; official code bigai-nlco/RouterLens, read to verify):

- Router Lens: fine-tune ONLY the routers of an MoE LLM on a context-dependent task
  (official `rt`: target modules `mlp.gate`), then count, per layer, how often each expert is among the
  top-k experts of each token (official `exp_act_count.py`: argsort of the router logits, top
  `num_act_experts`). The most activated experts after router tuning are the context-faithful experts.
  Our ranking score is the RISE of that activation frequency from the untuned to the router-tuned model,
  measured on the context-dependent tokens (positions whose next token must be copied from the passage);
  `score="tuned"` ranks by the tuned frequency alone, as the official count does; the official count is over
  all tokens of the prompt and answer, ours over the batches' `context_mask` tokens (give batches without a
  `context_mask` to count every real token, as the official code).
- CEFT: fine-tune only the selected experts' weights (official `ceft-N`: the top-N experts
  of EVERY layer by that count, their gate/up/down projections), everything else frozen, starting from
  the original (not router-tuned) model.
- Both train on the LM cross-entropy alone (`lm_loss_only_kwargs`): the official trainer computes it from the
  logits, so the base model's load-balancing loss (`output_router_logits`) never joins, whatever the config says.

In transformers 5.x the experts of a layer are stacked 3-D parameters, so `CEFTExperts` keeps the stacked
tensors frozen and trains copies of the selected experts' slices, written back into the stacked tensors on
every forward (`index_copy` + `torch.func.functional_call`); `merge_ceft` folds them back so the model's
parameter names are unchanged for `save_pretrained`.

Command (writes the ranked expert table as CSV + Markdown and a layer x expert heat map):

    python -m parrot.moe.methods.router_lens --out runs/router_lens [--steps 60] [--ceft-top-n 2 --ceft-steps 30]

It builds a tiny OLMoE from a config (or `--model DIR`, a local checkpoint) and a synthetic context-copy
task (`make_context_copy_batches`): "BOS k1 v1 ... kn vn SEP k ANS -> v", the answer copied from the passage.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import operator
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NoReturn

import torch
import torch.nn as nn

from ...fileio import (NotUTF8Error, atomic_file, atomic_write_text, decode_utf8, is_whole_number, non_negative_int,
                       positive_int)
from ..diagnostics import plot_expert_load
from ..routers import selection_from_indices
from .moe_blocks import find_moe_blocks, layer_index

logger = logging.getLogger(__name__)
PAD, BOS, SEP, ANS = 0, 1, 2, 3
NUM_SPECIAL = 4


# ----------------------------------------------------------------------------------------------------
# Synthetic context-grounded task
# ----------------------------------------------------------------------------------------------------


@dataclass
class ContextTaskConfig:
    """Key-value passages; the question names one key, the answer is its value copied from the passage.

    Token ids: 0 PAD, 1 BOS, 2 SEP, 3 ANS; keys in [4, 4 + num_keys); values (spans of `value_length`
    tokens) in [4 + num_keys, vocab_size).
    """

    vocab_size: int = 64
    num_keys: int = 16
    num_pairs: int = 4
    value_length: int = 2
    batch_size: int = 8
    num_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_pairs > self.num_keys:
            raise ValueError(f"ContextTaskConfig.num_pairs={self.num_pairs} exceeds num_keys={self.num_keys}")
        if self.value_length < 1:
            raise ValueError(f"ContextTaskConfig.value_length={self.value_length} must be >= 1")
        if self.vocab_size - NUM_SPECIAL - self.num_keys < 2:
            raise ValueError(f"ContextTaskConfig.vocab_size={self.vocab_size} leaves fewer than 2 value tokens")


def make_context_copy_batches(config: ContextTaskConfig) -> list[dict[str, torch.Tensor]]:
    """Batches with input_ids / attention_mask / labels (B, S) and context_mask (B, S) bool.

    Sequence: BOS k1 v1 ... kn vn SEP k_q ANS v_q, each v a span of m = value_length tokens. Only v_q's tokens
    are labels; `context_mask` marks the positions whose next token is one of them (ANS and v_q but its last
    token): the context-dependent tokens, whose next-token prediction needs the passage.
    """
    g = torch.Generator().manual_seed(config.seed)
    B, n, m = config.batch_size, config.num_pairs, config.value_length
    first_value = NUM_SPECIAL + config.num_keys
    batches = []
    for _ in range(config.num_batches):
        keys = torch.rand(B, config.num_keys, generator=g).argsort(-1)[:, :n] + NUM_SPECIAL  # (B, n) distinct
        values = torch.randint(first_value, config.vocab_size, (B, n, m), generator=g)  # (B, n, m)
        query = torch.randint(0, n, (B,), generator=g)
        rows = torch.arange(B)
        passage = torch.cat([keys[:, :, None], values], -1).reshape(B, n * (m + 1))
        ids = torch.cat([torch.full((B, 1), BOS), passage, torch.full((B, 1), SEP), keys[rows, query, None],
                         torch.full((B, 1), ANS), values[rows, query]], 1)  # (B, n(m+1) + 4 + m)
        labels = torch.full_like(ids, -100)
        labels[:, -m:] = ids[:, -m:]
        context_mask = torch.zeros_like(ids, dtype=torch.bool)
        context_mask[:, -m - 1 : -1] = True
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                        "context_mask": context_mask})
    return batches


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels") if k in batch}


# ----------------------------------------------------------------------------------------------------
# Routing frequencies and router tuning
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def record_gate_selection(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While active, every MoE router's chosen expert ids (T, k) are appended per block name."""
    records: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, block in find_moe_blocks(model):
        records[name] = []

        def hook(module, args, output, _name=name):
            records[_name].append(output[2].detach())  # router_indices (T, k)

        handles.append(block.gate.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _counted_tokens(batch: dict[str, torch.Tensor], index: int, mask_key: str) -> torch.Tensor:
    """(B*S,) bool: the tokens whose routing `routing_frequency` counts, batch[mask_key] (every token when absent)
    AND the batch's attention_mask when it has one: a padding position never counts, even where a caller's
    context mask marks it (right-padded batches built by slicing often do). Masks of another shape than
    input_ids would index the wrong tokens (or broadcast), so they are refused, naming the batch and the key."""
    ids = batch["input_ids"]
    counted = torch.ones(ids.shape, dtype=torch.bool)
    for key in dict.fromkeys((mask_key, "attention_mask")):
        mask = batch.get(key)
        if mask is None:
            continue
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"routing_frequency: batch {index}: {key!r} has shape {tuple(mask.shape)}, input_ids "
                             f"{tuple(ids.shape)}; a token mask needs one entry per input token")
        counted &= mask.detach().cpu() != 0  # 0/1 integer masks as well as bool
    return counted.reshape(-1)


@torch.no_grad()
def routing_frequency(model: nn.Module, batches: list[dict[str, torch.Tensor]], mask_key: str = "context_mask") -> tuple[list[str], torch.Tensor]:
    """Per MoE block and expert, the share of counted tokens whose top-k includes the expert (Router Lens: the
    activation frequency per (layer, expert) on context-dependent tokens). Returns (block names, frequency (L, E)
    float64): counts pooled over all batches, divided by the number of counted tokens, so each row sums to k.

    Counted tokens: batch[mask_key] ((B, S), bool or 0/1; every token when absent) that are real tokens of the
    batch's attention_mask (see `_counted_tokens`). Every batch's masks are checked before the first forward.
    """
    masks = [_counted_tokens(batch, i, mask_key) for i, batch in enumerate(batches)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts: torch.Tensor | None = None
    total = 0
    try:
        with record_gate_selection(model) as records:
            for i, (batch, mask) in enumerate(zip(batches, masks)):
                for r in records.values():
                    r.clear()
                attention = batch.get("attention_mask")
                model(input_ids=batch["input_ids"].to(device),
                      attention_mask=None if attention is None else attention.to(device))
                mask = mask.to(device)  # (T,)
                per_layer = []
                for name in records:
                    indices = records[name][-1]
                    if indices.shape[0] != mask.shape[0]:
                        raise ValueError(f"routing_frequency: batch {i}: {name} routed {indices.shape[0]} tokens, the "
                                         f"batch has {mask.shape[0]} (B x S)")
                    selected = selection_from_indices(indices, model.get_submodule(name).gate.num_experts)  # (T, E)
                    per_layer.append(selected[mask].double().sum(0))
                layer_counts = torch.stack(per_layer)  # (L, E)
                counts = layer_counts if counts is None else counts + layer_counts
                total += int(mask.sum())
            names = list(records)
    finally:
        model.train(was_training)
    if counts is None or total == 0:
        raise ValueError("routing_frequency: no selected tokens in the batches")
    return names, (counts / total).cpu()


def lm_loss_only_kwargs(model: nn.Module) -> dict[str, bool]:
    """Keywords for the model call that make its `.loss` the LM cross-entropy alone, as the official Router Lens /
    CEFT trainer (bigai-nlco/RouterLens `utils_train.CustomTrainer.compute_loss` computes the cross-entropy from the
    logits itself, so no load-balancing term ever reaches it): `{"output_router_logits": False}` for a model whose
    config sets `output_router_logits` (transformers then adds `router_aux_loss_coef` x the load-balancing loss of
    its routers to `.loss`), else `{}` (the keyword is only passed where the model reads it)."""
    config = getattr(model, "config", None)
    return {"output_router_logits": False} if getattr(config, "output_router_logits", False) else {}


def router_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every MoE router (the blocks' `gate`)."""
    return [(f"{name}.gate.{n}", p) for name, block in find_moe_blocks(model) for n, p in block.gate.named_parameters()]


def router_tune(model: nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float = 5e-3) -> list[float]:
    """Router Lens tuning: train only the MoE routers on the task's LM loss (official `rt`); returns losses.

    Every other parameter is frozen for the duration; requires_grad flags, the train/eval mode (of every
    submodule) and the routers' `.grad` (None for a fresh model) are restored afterwards, so no gradient of the
    router tuning leaks into a later optimizer step (CEFT or full fine-tuning of the same model).

    The loss is the LM loss alone, as the official trainer (which computes the cross-entropy itself): a model whose
    config sets `output_router_logits` (transformers then adds `router_aux_loss_coef` x the load-balancing loss to
    `.loss`) is run with `output_router_logits=False`, since the load-balancing pull is what router tuning removes.
    """
    from tqdm.auto import tqdm

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {m: m.training for m in model.modules()}
    routers = router_parameters(model)
    grads = [(p, p.grad) for _, p in routers]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in routers:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([p for _, p in routers], lr=lr)
    device = next(model.parameters()).device
    lm_loss_only = lm_loss_only_kwargs(model)
    model.train()
    losses = []
    try:
        for step in tqdm(range(steps), desc="router tuning", leave=False):
            loss = model(**_model_inputs(batches[step % len(batches)], device), **lm_loss_only).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        for module, training in modes.items():
            module.training = training
        for p, grad in grads:
            p.grad = grad
    return losses


@dataclass
class ExpertScore:
    """One (layer, expert) of the Router Lens ranking; frequencies are shares of context-dependent tokens."""

    block: str
    layer: int
    expert: int
    base_frequency: float
    tuned_frequency: float

    @property
    def rise(self) -> float:
        return self.tuned_frequency - self.base_frequency


def rank_experts(blocks: list[str], base: torch.Tensor, tuned: torch.Tensor, score: str = "rise") -> list[ExpertScore]:
    """All (layer, expert) pairs sorted by `score` ("rise" = tuned - base, or "tuned"), best first."""
    if base.shape != tuned.shape or base.shape[0] != len(blocks):
        raise ValueError(f"rank_experts: shapes {tuple(base.shape)} / {tuple(tuned.shape)} do not match {len(blocks)} blocks")
    if score not in _RANKING_SCORES:
        raise ValueError(f"rank_experts: score must be 'rise' or 'tuned', got {score!r}")
    for label, freq in (("base", base), ("tuned", tuned)):
        bad = (~torch.isfinite(freq)).nonzero().tolist()
        if bad:  # NaN sorts anywhere: the ranking would be arbitrary
            raise ValueError(f"rank_experts: {label} frequency is not finite at (block row, expert) {bad[:4]}")
    rows = [ExpertScore(b, layer_index(b), e, float(base[i, e]), float(tuned[i, e]))
            for i, b in enumerate(blocks) for e in range(base.shape[1])]
    return sorted(rows, key=lambda r: _score_key(score, r.rise, r.tuned_frequency))


_RANKING_SCORES = ("rise", "tuned")


def _score_key(score: str, rise: float, tuned: float) -> tuple[float, float]:
    """The sort key of `rank_experts` (ascending = best first): by rise, ties by tuned frequency, or the reverse."""
    return (-rise, -tuned) if score == "rise" else (-tuned, -rise)


def _out_of_order(pairs: list[tuple[float, float]]) -> dict[str, int | None]:
    """pairs: (rise, tuned) of ranked rows, best first -> {score: index of the first row that the score ranks above
    the row before it, None when the rows follow that score's order} (ties may come in any order)."""
    out: dict[str, int | None] = {}
    for score in _RANKING_SCORES:
        keys = [_score_key(score, *p) for p in pairs]
        out[score] = next((i for i in range(1, len(keys)) if keys[i] < keys[i - 1]), None)
    return out


@dataclass
class RouterLensResult:
    blocks: list[str]
    base_frequency: torch.Tensor  # (L, E)
    tuned_frequency: torch.Tensor  # (L, E)
    ranking: list[ExpertScore]
    losses: list[float]


def run_router_lens(model: nn.Module, train_batches: list[dict[str, torch.Tensor]], eval_batches: list[dict[str, torch.Tensor]] | None = None,
                    steps: int = 60, lr: float = 5e-3, score: str = "rise", restore_routers: bool = True) -> RouterLensResult:
    """Measure routing on context tokens, tune the routers, measure again, rank (layer, expert).

    With `restore_routers` the original router weights are put back afterwards (CEFT starts from the
    original model, as in the paper), also when tuning or measuring fails part-way (an exception, an interrupt).
    """
    eval_batches = eval_batches or train_batches
    saved = {n: p.detach().clone() for n, p in router_parameters(model)}
    try:
        blocks, base = routing_frequency(model, eval_batches)
        losses = router_tune(model, train_batches, steps, lr)
        _, tuned = routing_frequency(model, eval_batches)
    finally:
        if restore_routers:
            with torch.no_grad():
                for n, p in router_parameters(model):
                    p.copy_(saved[n])
    logger.info("router tuning loss %.4f -> %.4f over %d steps", losses[0] if losses else float("nan"),
                losses[-1] if losses else float("nan"), steps)
    return RouterLensResult(blocks, base, tuned, rank_experts(blocks, base, tuned, score), losses)


# ----------------------------------------------------------------------------------------------------
# Outputs: ranked table + heat maps
# ----------------------------------------------------------------------------------------------------

_TABLE_HEADER = ["rank", "block", "layer", "expert", "base_frequency", "tuned_frequency", "rise"]


def write_router_lens_outputs(result: RouterLensResult, out_dir: str | Path) -> dict[str, Path]:
    """router_lens_ranking.csv / .md, router_lens_rise.png (layer x expert rise), router_lens_tuned_load.png,
    router_lens_losses.json; each file is replaced whole (`parrot.fileio.atomic_file`): a failure mid-write keeps
    the previous file, never a truncated table that CEFT would read as a shorter ranking.

    The CSV (UTF-8, floats as `repr`) reads back equal with `load_ranking_csv`; a ranking that reader would refuse
    (see `_check_ranking`: empty, a non-finite value, a repeated expert, rows in neither score's order) is refused
    here before anything is written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _check_ranking(result.ranking)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "router_lens_ranking.csv", "markdown": out_dir / "router_lens_ranking.md",
             "heatmap": out_dir / "router_lens_rise.png", "tuned_load": out_dir / "router_lens_tuned_load.png",
             "losses": out_dir / "router_lens_losses.json"}
    with atomic_file(paths["csv"]) as staged, staged.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(_TABLE_HEADER)
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(_TABLE_HEADER) + " |", "|" + "---|" * len(_TABLE_HEADER)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    atomic_write_text(paths["markdown"], "\n".join(lines) + "\n")

    rise = (result.tuned_frequency - result.base_frequency).numpy()
    bound = max(float(abs(rise).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * rise.shape[1] + 3), max(3.0, 0.3 * rise.shape[0] + 1.5)))
    image = ax.imshow(rise, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(rise.shape[1]))
    ax.set_yticks(range(rise.shape[0]))
    ax.set_yticklabels([str(layer_index(b)) for b in result.blocks])
    ax.set_title("Router Lens: rise of routing frequency on context tokens")
    fig.colorbar(image, ax=ax, label="tuned - base frequency")
    fig.tight_layout()
    try:
        with atomic_file(paths["heatmap"]) as staged:
            fig.savefig(staged, dpi=100)
    finally:
        plt.close(fig)
    with atomic_file(paths["tuned_load"]) as staged:
        plot_expert_load({b: result.tuned_frequency[i].tolist() for i, b in enumerate(result.blocks)}, staged,
                         title="Routing frequency on context tokens after router tuning")
    atomic_write_text(paths["losses"], json.dumps({"router_tuning": result.losses}))
    return paths


def _check_ranking(ranking: list[ExpertScore]) -> list[list]:
    """The CSV rows (rank, block, layer, expert, base, tuned, rise) of a ranking that `load_ranking_csv` will read back
    equal: refuses (ValueError naming the 1-based row) an empty ranking, a layer / expert id that is not a
    non-negative integer, a layer that is not its block's, a non-finite frequency or rise, a repeated
    (block, expert), and rows in neither of `rank_experts`' orders."""
    if not ranking:
        raise ValueError("write_router_lens_outputs: the ranking is empty")
    rows, seen = [], {}
    for i, r in enumerate(ranking, start=1):
        where = f"write_router_lens_outputs: ranking row {i} ({r.block!r} expert {r.expert!r})"
        try:
            layer, expert = operator.index(r.layer), operator.index(r.expert)
            base, tuned = float(r.base_frequency), float(r.tuned_frequency)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
        if isinstance(r.layer, bool) or isinstance(r.expert, bool) or layer < 0 or expert < 0:
            raise ValueError(f"{where}: layer {r.layer!r} / expert {r.expert!r} must be non-negative integers")
        try:
            block_layer = layer_index(r.block)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
        if block_layer != layer:
            raise ValueError(f"{where}: layer {layer} is not its block's ({block_layer})")
        rise = tuned - base
        if not all(math.isfinite(v) for v in (base, tuned, rise)):
            raise ValueError(f"{where}: base {base!r} / tuned {tuned!r} / rise {rise!r} must be finite")
        if (r.block, expert) in seen:
            raise ValueError(f"{where}: repeats ranking row {seen[r.block, expert]}")
        seen[r.block, expert] = i
        rows.append([i, r.block, layer, expert, base, tuned, rise])
    bad = _out_of_order([(row[6], row[5]) for row in rows])
    if all(i is not None for i in bad.values()):
        i = bad["rise"]
        raise ValueError(f"write_router_lens_outputs: ranking row {i + 1} (rise {rows[i][6]!r}, tuned {rows[i][5]!r}) "
                         f"ranks below row {i} (rise {rows[i - 1][6]!r}, tuned {rows[i - 1][5]!r}): the ranking "
                         f"follows neither the rise nor the tuned order of rank_experts (first out of the tuned "
                         f"order: row {bad['tuned'] + 1})")
    return rows


_ID = re.compile(r"[0-9]+")  # ASCII digits only: no sign, blank, '1.0', '1e2' or non-ASCII digits
_RISE_TOLERANCE = 1e-9  # |rise column - (tuned - base)|: the writer's column is that difference exactly


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based line where the record starts, fields) of each non-blank CSV record of `text`."""
    reader = csv.reader(io.StringIO(text, newline=""))
    line = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: not a CSV record ({err})") from err
        if fields:
            yield line, fields
        line = reader.line_num + 1


def load_ranking_csv(path: str | Path) -> list[ExpertScore]:
    """Read back a ranking written by `write_router_lens_outputs`, best first; it reads back equal.

    The rows come in the order of their `rank` column (1..N, each once), whatever their order in the file, and that
    order must be one the writer writes (`rank_experts`): best first by `rise` (ties by tuned_frequency) or by
    `tuned_frequency` (ties by rise), judged on the file's columns; the `rise` column must be
    tuned_frequency - base_frequency (within 1e-9). Refused, with a ValueError naming the file and the 1-based line:
    bytes that are not UTF-8 (a leading BOM is allowed), a header with unknown, missing or repeated columns, a row
    with another number of fields than the header, a rank / layer / expert not written as a non-negative integer
    (ASCII digits), a rank of 0, a layer that is not its block's (`layers.<i>.`), a frequency or rise that is not a
    finite number, a repeated (block, expert) or rank, a rank above the number of rows, and a file without rows.
    """
    path = Path(path)
    try:
        text = decode_utf8(path.read_bytes())
    except NotUTF8Error as err:
        raise ValueError(f"{path}:{err.line}: {err} (write_router_lens_outputs writes UTF-8)") from None

    def fail(line: int, message: str) -> NoReturn:
        raise ValueError(f"{path}:{line}: {message}")

    records = _csv_records(path, text)
    first = next(records, None)
    if first is None:
        fail(1, f"empty ranking CSV (no header); expected the columns {_TABLE_HEADER}")
    header_line, header = first
    repeated = sorted({c for c in header if header.count(c) > 1})
    unknown = [c for c in header if c not in _TABLE_HEADER]
    missing = [c for c in _TABLE_HEADER if c not in header]
    if repeated or unknown or missing:
        problems = [f"lacks columns {missing}"] if missing else []
        problems += [f"has unknown columns {unknown}"] if unknown else []
        problems += [f"repeats columns {repeated}"] if repeated else []
        fail(header_line, f"ranking CSV {' and '.join(problems)}; expected the columns {_TABLE_HEADER}")
    column = {c: header.index(c) for c in _TABLE_HEADER}

    def integer(line: int, fields: list[str], name: str) -> int:
        text = fields[column[name]]
        if not _ID.fullmatch(text):
            fail(line, f"{name} {text!r} is not a non-negative integer")
        return int(text)

    def number(line: int, fields: list[str], name: str) -> float:
        text = fields[column[name]]
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            fail(line, f"{name} {text!r} is not a finite number")
        return value

    ranked: dict[int, tuple[int, ExpertScore, float]] = {}  # rank -> (line, row, rise column)
    lines_of: dict[tuple[str, int], int] = {}
    for line, fields in records:
        if len(fields) != len(header):
            fail(line, f"the row has {len(fields)} fields, the header {len(header)}")
        rank, layer, expert = (integer(line, fields, c) for c in ("rank", "layer", "expert"))
        block = fields[column["block"]]
        try:
            block_layer = layer_index(block)
        except ValueError as err:
            fail(line, f"block: {err}")
        if layer != block_layer:
            fail(line, f"layer {layer} is not the layer of block {block!r} ({block_layer})")
        base, tuned, rise = (number(line, fields, c) for c in ("base_frequency", "tuned_frequency", "rise"))
        if not abs(rise - (tuned - base)) <= _RISE_TOLERANCE:
            fail(line, f"rise {rise!r} is not tuned_frequency - base_frequency "
                       f"({tuned!r} - {base!r} = {tuned - base!r})")
        if rank == 0:
            fail(line, "rank 0: ranks count from 1")
        if rank in ranked:
            fail(line, f"rank {rank} repeats line {ranked[rank][0]}")
        if (block, expert) in lines_of:
            fail(line, f"{block} expert {expert} repeats line {lines_of[block, expert]}")
        lines_of[block, expert] = line
        ranked[rank] = (line, ExpertScore(block, layer, expert, base, tuned), rise)
    if not ranked:
        fail(header_line, "the ranking CSV has a header but no rows")
    beyond = [(line, rank) for rank, (line, _, _) in ranked.items() if rank > len(ranked)]
    if beyond:
        line, rank = min(beyond)
        fail(line, f"rank {rank} is outside 1..{len(ranked)} (the file has {len(ranked)} rows, each rank once)")
    order = [ranked[rank] for rank in range(1, len(ranked) + 1)]
    bad = _out_of_order([(rise, row.tuned_frequency) for _, row, rise in order])
    if all(i is not None for i in bad.values()):
        i, j = bad["rise"], bad["tuned"]
        (line, row, rise), (prev_line, prev, prev_rise) = order[i], order[i - 1]
        fail(line, f"rank {i + 1} ({row.block} expert {row.expert}: rise {rise!r}, tuned {row.tuned_frequency!r}) "
                   f"is ranked below rank {i} (line {prev_line}: rise {prev_rise!r}, tuned {prev.tuned_frequency!r}): "
                   f"the ranks follow neither the rise order nor the tuned_frequency order (rank {j + 1}, line "
                   f"{order[j][0]}, is out of that one) that write_router_lens_outputs writes")
    return [row for _, row, _ in order]


# ----------------------------------------------------------------------------------------------------
# CEFT: tune only the selected experts
# ----------------------------------------------------------------------------------------------------


def select_context_experts(ranking: list[ExpertScore], top_n: int, per_layer: bool = True) -> dict[str, list[int]]:
    """{block: expert ids} to tune: the top-N of every layer (official `ceft-N`) or the top-N overall.

    A top-N that takes every ranked expert of a layer (per layer) or of the model (overall) is allowed, since it is
    a valid ablation, but logged as a warning: CEFT then tunes all experts, which is not what the official `ceft-8`
    does on a model with 64 experts per layer."""
    if not is_whole_number(top_n) or top_n < 1:
        raise ValueError(f"select_context_experts: top_n={top_n!r} must be a whole number >= 1")
    chosen: dict[str, list[int]] = {}
    if per_layer:
        ranked: dict[str, int] = {}
        for r in ranking:
            ids = chosen.setdefault(r.block, [])
            ranked[r.block] = ranked.get(r.block, 0) + 1
            if len(ids) < top_n:
                ids.append(r.expert)
        everything = [b for b, n in ranked.items() if n <= top_n]
        if everything:
            logger.warning("CEFT top_n=%d selects every ranked expert of %d of %d layers (e.g. %s): they tune all "
                           "their experts", top_n, len(everything), len(ranked), everything[0])
    else:
        for r in ranking[:top_n]:
            chosen.setdefault(r.block, []).append(r.expert)
        if top_n >= len(ranking):
            logger.warning("CEFT top_n=%d selects all %d ranked experts: every expert tunes", top_n, len(ranking))
    return {b: sorted(ids) for b, ids in chosen.items()}


class CEFTExperts(nn.Module):
    """A frozen stacked-experts module whose selected experts' weights train (see the module docstring).

    Every parameter of `base` whose first dim is the expert count (gate_up_proj (E, 2I, D), down_proj
    (E, D, I), biases if any) gets a trainable copy of the selected rows, `tuned_<name>` (n, ...).
    """

    def __init__(self, base: nn.Module, expert_ids: list[int]):
        super().__init__()
        num_experts = base.num_experts
        if not expert_ids or any(not 0 <= e < num_experts for e in expert_ids) or len(set(expert_ids)) != len(expert_ids):
            raise ValueError(f"CEFTExperts: expert ids {expert_ids} must be distinct and in [0, {num_experts})")
        self.base = base
        self.num_experts = num_experts
        base.requires_grad_(False)
        # On the experts' device: `merged_parameters` indexes their weights with it (a model already on a GPU).
        device = next(base.parameters()).device
        self.register_buffer("expert_ids", torch.tensor(sorted(expert_ids), dtype=torch.long, device=device),
                             persistent=True)
        self.stacked_names = [n for n, p in base.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts]
        if not self.stacked_names:
            raise ValueError(f"CEFTExperts: {type(base).__name__} has no stacked (E, ...) expert parameters")
        ids = self.expert_ids
        for n in self.stacked_names:
            self.register_parameter(f"tuned_{n}", nn.Parameter(getattr(base, n).detach()[ids].clone()))

    def merged_parameters(self) -> dict[str, torch.Tensor]:
        ids = self.expert_ids
        return {n: getattr(self.base, n).index_copy(0, ids, getattr(self, f"tuned_{n}")) for n in self.stacked_names}

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.base, self.merged_parameters(), args, kwargs)


def prepare_ceft(model: nn.Module, selection: dict[str, list[int]]) -> list[str]:
    """Freeze the model and make only the selected experts trainable; return the trainable parameter names.

    The whole selection is checked against the model before anything changes (a selection from a ranking of another
    model -- more layers, more experts -- is refused naming each block and expert id that does not fit, and the
    model is left as it was)."""
    blocks = dict(find_moe_blocks(model))
    unknown = sorted(set(selection) - set(blocks))
    if unknown:
        raise ValueError(f"prepare_ceft: {unknown} are not MoE blocks of {type(model).__name__} (its {len(blocks)} MoE "
                         f"blocks: {sorted(blocks)[:4]}{' ...' if len(blocks) > 4 else ''}); a ranking of another model?")
    problems = []
    for name, ids in selection.items():
        num_experts = blocks[name].gate.num_experts
        ids = list(ids)
        out_of_range = [e for e in ids if not hasattr(e, "__index__") or not 0 <= e.__index__() < num_experts]
        if out_of_range:
            problems.append(f"{name} has {num_experts} experts (ids 0..{num_experts - 1}), the selection asks for "
                            f"{out_of_range}")
        elif not ids or len(set(ids)) != len(ids):
            problems.append(f"{name}: expert ids {ids} must be a non-empty list of distinct ids")
        if isinstance(blocks[name].experts, CEFTExperts):
            problems.append(f"{name} already has CEFT experts")
    if problems:
        raise ValueError(f"prepare_ceft: the selection does not fit {type(model).__name__} (a ranking of another "
                         f"model?):\n  " + "\n  ".join(problems))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, ids in selection.items():
        blocks[name].experts = CEFTExperts(blocks[name].experts, [e.__index__() for e in ids])
    return [n for n, p in model.named_parameters() if p.requires_grad]


def ceft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned expert slices and their expert ids only."""
    return {f"{n}.{k}": v.detach().clone() for n, m in model.named_modules() if isinstance(m, CEFTExperts)
            for k, v in m.state_dict().items() if not k.startswith("base.")}


@torch.no_grad()
def merge_ceft(model: nn.Module) -> list[str]:
    """Write the tuned slices into the stacked tensors and unwrap, restoring the original parameter names."""
    merged = []
    for name, module in list(model.named_modules()):
        if isinstance(module, CEFTExperts):
            for n, value in module.merged_parameters().items():
                getattr(module.base, n).copy_(value)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
            merged.append(name)
    return merged


# ----------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------


def _tiny_olmoe(vocab: int, seed: int) -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                         bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD)
    return OlmoeForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m parrot.moe.methods.router_lens", description="Router Lens (router tuning -> ranked context-faithful experts) + optional CEFT")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", default=None, help="local MoE causal-LM checkpoint directory (default: a tiny random OLMoE)")
    parser.add_argument("--steps", type=positive_int, default=60, help="router-tuning steps")
    parser.add_argument("--lr", type=float, default=5e-3, help="router-tuning learning rate")
    parser.add_argument("--score", choices=("rise", "tuned"), default="rise", help="ranking score")
    parser.add_argument("--vocab", type=positive_int, default=64, help="synthetic task vocabulary (must fit the model)")
    parser.add_argument("--batches", type=positive_int, default=8)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--ceft-top-n", type=non_negative_int, default=0, help="then CEFT-tune the top-N experts of every layer (0: skip)")
    parser.add_argument("--ceft-steps", type=positive_int, default=30)
    parser.add_argument("--ceft-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (tiny models run fastest on 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    else:
        model = _tiny_olmoe(args.vocab, args.seed)
    if model.get_input_embeddings().num_embeddings < args.vocab:
        raise ValueError(f"--vocab {args.vocab} exceeds the model's vocabulary ({model.get_input_embeddings().num_embeddings})")
    task = ContextTaskConfig(vocab_size=args.vocab, batch_size=args.batch_size, num_batches=args.batches, seed=args.seed)
    train = make_context_copy_batches(task)
    held_out = make_context_copy_batches(ContextTaskConfig(**{**asdict(task), "seed": args.seed + 1, "num_batches": 2}))
    result = run_router_lens(model, train, held_out, steps=args.steps, lr=args.lr, score=args.score)
    paths = write_router_lens_outputs(result, args.out)
    print("\n".join(paths["markdown"].read_text().splitlines()[:12]))  # header + top 10
    if args.ceft_top_n:
        from .tuning import train_steps

        selection = select_context_experts(result.ranking, args.ceft_top_n)
        trainable = prepare_ceft(model, selection)
        losses = train_steps(model, [_model_inputs(b, next(model.parameters()).device) for b in train], args.ceft_steps,
                             args.ceft_lr, forward_kwargs=lm_loss_only_kwargs(model))  # CE only, as the official CEFT
        atomic_write_text(Path(args.out) / "ceft.json", json.dumps({"selection": selection, "trainable": trainable, "losses": losses}, indent=2))
        logger.info("CEFT (%d tensors) loss %.4f -> %.4f", len(trainable), losses[0], losses[-1])
    for kind, path in paths.items():
        logger.info("wrote %s: %s", kind, path)


if __name__ == "__main__":
    main()
