"""Tuning methods for MoE base models (and dense models turned into MoE), built on `parrot.moe`.

- `perft`: PERFT (Liu et al., 2024, arXiv 2411.08212) -- PEFT experts beside each frozen sparse MoE block,
  variants perft-r (own library router, top-k), perft-e (frozen original router), perft-d (dense), perft-s
  (one shared expert). `PerftConfig`, `inject_perft`, `collect_perft_routing`, `perft_aux_loss`,
  `perft_state_dict` / `load_perft_state_dict`, `save_perft` / `load_perft`.
- `factorllm`: FactorLLM (Zhao et al., 2024, arXiv 2408.11855) -- a dense SwiGLU FFN split into E experts
  along the intermediate dim (exact with all experts), a library top-k router trained by the
  Prior-Approximate loss, k = 1..E report. `FactorLLMConfig`, `FactorizedMLP`, `inject_factorllm`,
  `prior_approximate_loss`, `set_factorllm_top_k`, `factorllm_report`; command
  `python -m parrot.moe.methods.factorllm --out DIR`.
- `router_lens`: Router Lens + CEFT (Bai et al., 2025, arXiv 2508.19594) -- router-only tuning on a
  context-grounded task, (layer, expert) ranked by the rise of routing on context-dependent tokens, then
  CEFT tunes only the top experts. `run_router_lens`, `rank_experts`, `write_router_lens_outputs`,
  `select_context_experts`, `prepare_ceft`, `merge_ceft`; command
  `python -m parrot.moe.methods.router_lens --out DIR` (ranked table CSV/Markdown + layer x expert heat map).

Stage-2 trainer entry point (`--tuning perft-r|perft-e|perft-d|perft-s|factorllm|ceft`):

    from parrot.moe.methods import prepare_for_tuning
    setup = prepare_for_tuning(model.language_model_or_model, args.tuning, **method_settings)
    # setup.trainable: parameter names that train (everything else frozen)
    # out = model(**batch, **setup.forward_kwargs): .loss is the method's official loss (CEFT: the LM
    #     cross-entropy alone; PERFT: with the base routers' load-balancing loss, output_router_logits=True)
    # setup.aux_loss(): router aux losses of the latest forward -> add to the LM loss
    # setup.routing():  {module: RouterOutput} for RouterStatsTracker / plot_expert_load
    # setup.state_dict(): the tuned weights only (for adapter checkpoints)

See `parrot.moe.methods.tuning` for each method's settings.
"""

import importlib

# Names exported here, by submodule. They are imported on first use (PEP 562), not with the package: so that
# `python -m parrot.moe.methods.factorllm` / `.router_lens` run their module once, as __main__, instead of after a
# copy of it was imported by this package (runpy's "found in sys.modules" warning, and two module objects).
_EXPORTS = {
    "factorllm": (
        "FactorizedMLP", "FactorLLMConfig", "collect_factorllm_routing", "factorllm_report", "inject_factorllm",
        "prior_approximate_loss", "set_factorllm_top_k",
    ),
    "perft": (
        "PERFT_VARIANTS", "bottleneck_experts", "PerftConfig", "collect_perft_routing", "inject_perft", "load_perft",
        "load_perft_state_dict", "perft_adapters", "perft_aux_loss", "perft_forward_kwargs", "perft_state_dict",
        "save_perft",
    ),
    "router_lens": (
        "CEFTExperts", "ContextTaskConfig", "ExpertScore", "RouterLensResult", "lm_loss_only_kwargs", "load_ranking_csv",
        "make_context_copy_batches", "merge_ceft", "prepare_ceft", "rank_experts", "router_tune", "routing_frequency",
        "run_router_lens", "select_context_experts", "write_router_lens_outputs",
    ),
    "moe_blocks": (
        "find_moe_blocks", "is_moe_block",
    ),
    "tuning": (
        "TUNING_METHODS", "TuningSetup", "prepare_for_tuning",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _EXPORTS:  # a submodule: `methods.perft`
        return importlib.import_module(f".{name}", __name__)
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
