"""FactorLLM: exact factorisation of a dense SwiGLU FFN, top-k routing and the Prior-Approximate loss (float64)."""

import copy
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from parrot.moe.methods import (FactorizedMLP, FactorLLMConfig, factorllm_report, inject_factorllm, prepare_for_tuning,
                                prior_approximate_loss, set_factorllm_top_k)
from parrot.moe.methods.factorllm import main as factorllm_main
from parrot.moe.methods.factorllm import write_report
from parrot.moe.methods.tuning import train_steps


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).double()


def _naive_expert(mlp, neurons: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Expert = the dense FFN restricted to `neurons` of the intermediate dim, for one token x (D,)."""
    g = mlp.gate_proj.weight[neurons] @ x
    u = mlp.up_proj.weight[neurons] @ x
    return mlp.down_proj.weight[:, neurons] @ (F.silu(g) * u)


@pytest.mark.parametrize("num_experts", [1, 3, 4])
def test_all_experts_active_equals_dense_ffn(num_experts):
    model = _llama()
    dense = model.model.layers[0].mlp
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    permutation = torch.randperm(24)
    layer = FactorizedMLP(dense, FactorLLMConfig(num_experts=num_experts, top_k=num_experts), permutation).eval()
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)
    # each expert is exactly its slice of neurons
    flat = x.reshape(-1, 16)
    outputs = layer.all_expert_outputs(flat)
    chunk = 24 // num_experts
    for e in range(num_experts):
        neurons = permutation[e * chunk : (e + 1) * chunk]
        expected = torch.stack([_naive_expert(dense, neurons, flat[t]) for t in range(flat.shape[0])])
        torch.testing.assert_close(outputs[:, e], expected, rtol=1e-12, atol=1e-12)


def test_whole_model_with_all_experts_equals_dense_model():
    model = _llama()
    ids = torch.randint(0, 40, (2, 7))
    expected = model(input_ids=ids).logits
    factor = copy.deepcopy(model)
    names = inject_factorllm(factor, FactorLLMConfig(num_experts=4, top_k=4))
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    factor.eval()
    torch.testing.assert_close(factor(input_ids=ids).logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_routing_matches_naive_reference(k):
    dense = _llama().model.layers[1].mlp
    E = 4
    layer = FactorizedMLP(dense, FactorLLMConfig(num_experts=E, top_k=k))
    with torch.no_grad():
        layer.router.gate.weight.normal_()
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    flat = x.reshape(-1, 16)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        top = torch.topk(torch.softmax(layer.router.gate.weight @ flat[t], -1), k).indices
        for e in top:  # hard unit weights, sum rescaled by E / k (official FactorLLM)
            expected[t] += _naive_expert(dense, torch.arange(int(e) * 6, (int(e) + 1) * 6), flat[t]) * (E / k)
    layer.eval()
    torch.testing.assert_close(layer(x).reshape(-1, 16), expected, rtol=1e-12, atol=1e-12)  # sparse grouped path
    layer.train()
    torch.testing.assert_close(layer(x).reshape(-1, 16), expected, rtol=1e-12, atol=1e-12)  # all-experts training path
    assert layer.last_routing.weights.sum(-1).eq(k).all()


def test_prior_approximate_loss_matches_naive_loop():
    torch.manual_seed(3)
    T, E, D, k = 6, 4, 5, 2
    outputs = torch.randn(T, E, D, dtype=torch.float64)
    probs = torch.softmax(torch.randn(T, E, dtype=torch.float64), -1)
    mask = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool)
    total, count = 0.0, 0
    for t in range(T):
        if not mask[t]:
            continue
        dense = outputs[t].sum(0)
        dist = [float(((outputs[t, e] - dense / (E / k)) ** 2).mean()) for e in range(E)]
        chosen = sorted(range(E), key=lambda e: dist[e])[:k]
        label = torch.tensor([1.0 if e in chosen else 0.0 for e in range(E)], dtype=torch.float64)
        q = torch.softmax(label, -1).clamp(1e-7, 1 - 1e-7)
        p = probs[t].clamp(1e-7, 1 - 1e-7)
        total += float((p * torch.log(p / q)).sum())
        count += 1
    assert prior_approximate_loss(probs, outputs, k, mask).item() == pytest.approx(total / count, rel=1e-12)


def test_router_learns_only_from_the_pa_loss_and_base_stays_frozen():
    model = _llama()
    setup = prepare_for_tuning(model, "factorllm", num_experts=4, top_k=2, train_experts=False)
    assert setup.trainable == ["model.layers.0.mlp.router.gate.weight", "model.layers.1.mlp.router.gate.weight"]
    ids = torch.randint(0, 40, (2, 6))
    out = model(input_ids=ids, labels=ids)
    assert not out.loss.requires_grad  # hard unit weights: the task loss does not reach the router
    out = model(input_ids=ids, labels=ids)
    (out.loss + setup.aux_loss()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(setup.trainable)


def test_padding_is_left_out_of_the_aux_losses():
    """A right-padded batch: the prior-approximate and balance losses and the statistics of a layer equal those of
    the same layer run on the real tokens alone (the model call's attention mask reaches the layers)."""
    model = _llama()
    setup = prepare_for_tuning(model, "factorllm", num_experts=4, top_k=2)
    layer = model.model.layers[0].mlp
    layer.router.balance_coef = 0.01
    inputs = {}
    layer.register_forward_hook(lambda module, args, out: inputs.__setitem__("x", args[0].detach()))
    ids = torch.randint(0, 40, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    padded = setup.routing()["model.layers.0.mlp"]
    assert torch.equal(layer.token_mask, mask.bool())
    real_tokens = inputs["x"][mask.bool()][None]  # (1, 9, D): no padding, no mask
    layer.token_mask = None
    layer(real_tokens)
    alone = layer.last_routing
    assert set(padded.aux_losses) == set(alone.aux_losses) == {"prior_approx", "balance"}
    for name in alone.aux_losses:
        torch.testing.assert_close(padded.aux_losses[name], alone.aux_losses[name], rtol=1e-12, atol=0)
    torch.testing.assert_close(padded.stats["load"], alone.stats["load"], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="does not cover"):
        layer.token_mask = mask[:1].bool()
        layer(inputs["x"])


def test_report_at_k_equal_e_matches_dense_and_tiny_training_lowers_loss(tmp_path):
    dense = _llama().float()
    factor = copy.deepcopy(dense)
    setup = prepare_for_tuning(factor, "factorllm", num_experts=4, top_k=2)
    torch.manual_seed(1)
    ids = torch.randint(0, 40, (4, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = factorllm_report(dense, factor, [batch], repeats=1)
    assert [r.k for r in rows] == [1, 2, 3, 4]
    assert rows[-1].next_token_agreement == 1.0 and rows[-1].loss == pytest.approx(rows[-1].dense_loss, rel=1e-5)
    assert [r.ffn_flops_fraction for r in rows] == [0.25, 0.5, 0.75, 1.0]
    csv_path, md_path = write_report(rows, tmp_path)
    assert len(csv_path.read_text().splitlines()) == 5 and "next_token_agreement" in md_path.read_text()
    pa_before = None
    losses = []

    def record(step):
        nonlocal pa_before
        pa = sum(r.aux_losses["prior_approx"].detach().item() for r in setup.routing().values())
        pa_before = pa if pa_before is None else pa_before
        losses.append(pa)

    lm = train_steps(factor, [batch], 25, 1e-2, aux_loss=setup.aux_loss, on_step=record)
    assert sum(lm[-3:]) / 3 < lm[0] - 0.1
    assert losses[-1] < pa_before  # the router approaches the prior
    set_factorllm_top_k(factor, 4)
    assert all(m.top_k == 4 for m in factor.modules() if isinstance(m, FactorizedMLP))


def test_command_writes_report(tmp_path):
    factorllm_main(["--out", str(tmp_path), "--dense-steps", "3", "--router-steps", "3", "--hidden", "16",
                    "--intermediate", "32", "--layers", "1", "--vocab", "31"])
    assert (tmp_path / "factorllm_report.csv").is_file() and (tmp_path / "factorllm_report.md").is_file()


def test_bad_input_is_rejected():
    dense = _llama().model.layers[0].mlp
    with pytest.raises(ValueError, match="divisible"):
        FactorizedMLP(dense, FactorLLMConfig(num_experts=5, top_k=1))
    with pytest.raises(ValueError, match="permutation"):
        FactorizedMLP(dense, FactorLLMConfig(num_experts=4, top_k=1), torch.zeros(24))
    with pytest.raises(ValueError, match="top_k"):
        FactorLLMConfig(num_experts=2, top_k=3)


def test_pa_prior_measures_the_original_dense_ffn_after_the_experts_trained():
    """The PA teacher is the original dense FFN (official: the frozen dense projections), not the sum of the experts:
    once trained experts drift, the prior must still pick the experts closest to the teacher's share."""
    model = _llama()
    dense = copy.deepcopy(model.model.layers[0].mlp)  # the teacher, untouched
    E, k = 4, 2
    inject_factorllm(model, FactorLLMConfig(num_experts=E, top_k=k, train_experts=True))
    layer = model.model.layers[0].mlp
    assert set(layer.state_dict()) == {"experts.gate_proj", "experts.up_proj", "experts.down_proj", "router.gate.weight"}
    with torch.no_grad():  # what expert training does: the experts move away from their slices
        layer.experts.down_proj.add_(torch.randn_like(layer.experts.down_proj))
        layer.router.gate.weight.normal_()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    layer.train()
    layer(x)
    flat = x.reshape(-1, 16)
    total = 0.0
    with torch.no_grad():  # the reference loop
        for t in range(flat.shape[0]):
            outs = torch.stack([layer.experts.down_proj[e].T @ (F.silu(layer.experts.gate_proj[e].T @ flat[t])
                                                               * (layer.experts.up_proj[e].T @ flat[t])) for e in range(E)])
            teacher = dense(flat[t][None])[0]
            dist = [float(((outs[e] - teacher / (E / k)) ** 2).mean()) for e in range(E)]
            chosen = sorted(range(E), key=lambda e: dist[e])[:k]
            q = torch.softmax(torch.tensor([float(e in chosen) for e in range(E)], dtype=torch.float64), -1).clamp(1e-7, 1 - 1e-7)
            p = torch.softmax(layer.router.gate.weight @ flat[t], -1).clamp(1e-7, 1 - 1e-7)
            total += float((p * (p / q).log()).sum())
    got = layer.last_routing.aux_losses["prior_approx"].item()
    assert got == pytest.approx(total / flat.shape[0], rel=1e-10)
    # frozen experts: their sum is the teacher, no copy of the dense weights is kept
    frozen = FactorizedMLP(_llama().model.layers[0].mlp, FactorLLMConfig(num_experts=E, top_k=k, train_experts=False))
    assert frozen.teacher_output(flat) is None


def test_sparse_inference_path_under_bfloat16_autocast():
    """float32 weights under bfloat16 autocast (HF Trainer evaluation): the grouped top-k path must run (its
    accumulator takes the experts' output dtype) and agree with the training path and the float32 result."""
    dense = _llama().float().model.layers[0].mlp
    layer = FactorizedMLP(dense, FactorLLMConfig(num_experts=4, top_k=2))
    with torch.no_grad():
        layer.router.gate.weight.normal_()
    x = torch.randn(2, 5, 16)
    layer.eval()
    with torch.no_grad():
        reference = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sparse = layer(x)
        layer.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = layer(x)
    assert sparse.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(sparse.float(), reference, rtol=0.05, atol=0.02)
    torch.testing.assert_close(sparse, full, rtol=0.02, atol=0.01)


@pytest.mark.parametrize("command", ["factorllm", "router_lens"])
def test_method_commands_run_their_module_once(command):
    """`python -m parrot.moe.methods.<command>` runs the module as __main__ only: the package does not import it
    first (runpy would warn that it found the module in sys.modules, and two copies of it would exist)."""
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", f"parrot.moe.methods.{command}",
                           "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_methods_package_exports_resolve():
    import parrot.moe.methods as methods

    for name in methods.__all__:
        module = importlib.import_module(f"parrot.moe.methods.{methods._MODULE_OF[name]}")
        assert getattr(methods, name) is getattr(module, name)
    assert methods.perft is importlib.import_module("parrot.moe.methods.perft")
    with pytest.raises(AttributeError, match="no_such_name"):
        methods.no_such_name
