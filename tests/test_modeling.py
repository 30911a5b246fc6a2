"""ParrotForCausalLM: HF round trip, generation, padding invariance, tower features, config errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

from parrot.model import ParrotConfig, ParrotForCausalLM
from parrot.model.vision import build_open_clip_visual

from .conftest import IMAGE_TOKEN_ID, tiny_parrot_config

COMBOS = [("hf_clip", "qwen2"), ("hf_clip", "llama"), ("open_clip", "qwen2"), ("open_clip", "llama")]


def prompt_batch(padding_side="left"):
    seqs = [[1, 2, IMAGE_TOKEN_ID, 3, 4, 9], [6, IMAGE_TOKEN_ID, 7]]
    T = max(map(len, seqs))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = torch.tensor(s), 1
    return ids, mask, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("vision,text", COMBOS)
def test_save_load_round_trip_and_generate(tmp_path, vision, text):
    model = ParrotForCausalLM(tiny_parrot_config(vision, text)).eval()
    ids, mask, pixels = prompt_batch()
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ParrotForCausalLM)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, logits)

    new = loaded.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 4
    sampled = loaded.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=True, top_p=0.9,
        temperature=0.8,
    )
    assert sampled.shape[0] == 2 and sampled.dtype == torch.long


def greedy_without_cache(model, ids, mask, pixels, steps):
    """Reference decoding: re-run the full forward pass for every new token (no KV cache). The generated tokens are
    passed as labels, so that the MoE router sees the prompt only, as `generate` routes (answers are labelled)."""
    new = []
    labels = torch.full_like(ids, -100)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        labels = torch.cat([labels, token], 1)
    return torch.cat(new, 1)


@pytest.mark.parametrize("vision,text", [COMBOS[0], COMBOS[3]])
def test_generate_with_cache_equals_no_cache_greedy(vision, text):
    config = tiny_parrot_config(vision, text)
    config.text_config.eos_token_id = None  # decode a fixed number of steps
    model = ParrotForCausalLM(config).eval()
    ids, mask, pixels = prompt_batch("left")
    expected = greedy_without_cache(model, ids, mask, pixels, 5)
    got = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, min_new_tokens=5, do_sample=False
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("text", ["qwen2", "gpt2"])  # gpt2: learned absolute positions, which RoPE's invariance hid
def test_left_padded_batch_equals_single_samples(text):
    torch.manual_seed(0)
    model = ParrotForCausalLM(tiny_parrot_config(text=text)).eval()
    ids, mask, pixels = prompt_batch("left")
    batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
    for b in range(2):
        keep = mask[b].bool()
        single = model(input_ids=ids[b][keep][None], pixel_values=pixels[b : b + 1]).logits[:, -1]
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-4, atol=1e-5)


def test_training_loss_ignores_visual_tokens_and_prompt():
    model = ParrotForCausalLM(tiny_parrot_config()).eval()
    ids, mask, pixels = prompt_batch("right")
    labels = torch.full_like(ids, -100)
    labels[0, 4:6] = ids[0, 4:6]  # only two answer tokens of sample 0
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    # Reference: cross-entropy of exactly those two tokens, predicted from the previous position.
    merged_pos = [4 + 16, 5 + 16]  # each image adds N_v - 1 = 16 positions before them
    logits = out.logits[0]
    ref = torch.nn.functional.cross_entropy(logits[[p - 1 for p in merged_pos]], ids[0, 4:6])
    torch.testing.assert_close(out.loss, ref)
    assert out.router_probs.shape == (2, 3)
    torch.testing.assert_close(out.router_probs.sum(-1), torch.ones(2))


def test_moe_off_is_identity():
    config = tiny_parrot_config(use_moe=False)
    model = ParrotForCausalLM(config).eval()
    ids, mask, pixels = prompt_batch()
    before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        for p in model.moe.parameters():
            p.normal_()
    after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert before.router_probs is None
    assert torch.equal(before.logits, after.logits)


def test_hf_clip_features_select_layer_and_cls():
    config = tiny_parrot_config(vision_select_layer=-2, vision_select_feature="patch", use_moe=False)
    model = ParrotForCausalLM(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = model.vision_tower.model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(model.vision_tower(pixels), expected)
    assert config.num_image_tokens == 16


def test_open_clip_features_select_layer():
    config = tiny_parrot_config("open_clip", vision_select_layer=-2)  # output of block 0 of 2
    model = ParrotForCausalLM(config).eval()
    visual = model.vision_tower.model
    pixels = torch.randn(2, 3, 32, 32)
    # Reference: the ViT by hand -- patchify, class token, positions, ln_pre, first residual block.
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, 16, W)
    cls = visual.class_embedding.expand(2, 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
    x = visual.transformer.resblocks[0](x)
    torch.testing.assert_close(model.vision_tower(pixels), x)


@pytest.mark.parametrize("projector,expected_layers", [("linear", 1), ("mlp3x_gelu", 5)])
def test_projector_types(projector, expected_layers):
    model = ParrotForCausalLM(tiny_parrot_config(projector_type=projector))
    layers = [model.mm_projector] if projector == "linear" else list(model.mm_projector)
    assert len(layers) == expected_layers
    assert model.encode_images(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_identity_projector_needs_equal_widths():
    with pytest.raises(ValueError, match="identity.*hidden_size"):
        ParrotForCausalLM(tiny_parrot_config(projector_type="identity"))


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(projector_type="conv3x"), "projector_type"),
        (dict(image_token_id=-1), "image_token_id"),
        (dict(image_token_id=64), "image_token_id"),
        (dict(vision_select_layer=7), "vision_select_layer"),
        (dict(moe_top_k=4), "moe_top_k"),
        (dict(use_moe=True, vision_select_feature="patch"), "cls_patch"),
        # NaN / zero std would make every logit NaN without an error
        (dict(moe_weight=float("nan")), "moe_weight"),
        (dict(image_std=[0.0, 0.2, 0.2]), "image_std"),
        (dict(image_mean=[float("nan"), 0.4, 0.4]), "image_mean"),
    ],
)
def test_wrong_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ParrotForCausalLM(tiny_parrot_config(**overrides))


def test_image_placeholder_errors():
    model = ParrotForCausalLM(tiny_parrot_config()).eval()
    ids, mask, pixels = prompt_batch()
    with pytest.raises(ValueError, match="placeholder.*sample 0: 1, sample 1: 1"):  # more images than placeholders
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 32, 32))
    no_placeholder = ids.masked_fill(ids == IMAGE_TOKEN_ID, 1)
    with pytest.raises(ValueError, match="placeholder"):  # image given, prompt without <image>
        model(input_ids=no_placeholder, attention_mask=mask, pixel_values=pixels)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids, attention_mask=mask)


def test_from_parts_with_a_half_precision_vision_checkpoint_is_one_dtype(tmp_path):
    """CLIP towers are often saved in float16: loaded as float32 like the LLM and projector, so a forward runs."""
    reference = tiny_parrot_config()
    Qwen2ForCausalLM(Qwen2Config(**reference.text_config.to_dict())).save_pretrained(tmp_path / "llm")
    tower = CLIPVisionModel(reference.vision_config).half()
    tower.save_pretrained(tmp_path / "clip16")
    model = ParrotForCausalLM.from_parts(str(tmp_path / "llm"), str(tmp_path / "clip16"),
                                         image_token_id=IMAGE_TOKEN_ID, use_moe=True, moe_num_experts=2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, p in tower.state_dict().items():  # the float16 values, widened exactly
        assert torch.equal(model.vision_tower.model.state_dict()[name], p.float()), name
    size = reference.vision_config.image_size
    out = model(input_ids=torch.tensor([[1, IMAGE_TOKEN_ID, 3]]), pixel_values=torch.randn(1, 3, size, size))
    assert torch.isfinite(out.logits).all()


def test_from_parts_loads_local_checkpoints(tmp_path):
    """Real-scale loading path (Qwen LLM + CLIP tower from local dirs), exercised on tiny saved checkpoints."""
    reference = tiny_parrot_config()
    llm = Qwen2ForCausalLM(Qwen2Config(**reference.text_config.to_dict()))
    llm.save_pretrained(tmp_path / "llm")
    tower = CLIPVisionModel(reference.vision_config)
    tower.save_pretrained(tmp_path / "clip")
    model = ParrotForCausalLM.from_parts(
        str(tmp_path / "llm"), str(tmp_path / "clip"), image_token_id=IMAGE_TOKEN_ID, use_moe=True, moe_num_experts=2
    )
    for name, p in llm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], p), name
    for name, p in tower.state_dict().items():
        assert torch.equal(model.vision_tower.model.state_dict()[name], p), name
    assert model.config.moe_num_experts == 2

    open_clip_config = tiny_parrot_config("open_clip").vision_config
    visual = build_open_clip_visual(open_clip_config)
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, tmp_path / "open_clip.pt")
    model = ParrotForCausalLM.from_parts(
        str(tmp_path / "llm"), str(tmp_path / "open_clip.pt"), IMAGE_TOKEN_ID, vision_config=open_clip_config
    )
    for name, p in visual.state_dict().items():
        assert torch.equal(model.vision_tower.model.state_dict()[name], p), name


@pytest.mark.parametrize("text", ["qwen2", "qwen2_moe"])
def test_from_parts_language_model_is_the_loaded_one_causal(tmp_path, text):
    """from_parts hands the loaded LLM's own config to ParrotConfig; it used to reset that config's attention (and
    experts) implementation to None, leaving the LLM without a causal mask: stage 1 from local checkpoints trained
    on a model that attends to later tokens, and its logits differed from the LLM's."""
    reference = tiny_parrot_config()
    settings = dict(reference.text_config.to_dict(), model_type=text)
    if text == "qwen2_moe":
        settings.update(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                        num_experts_per_tok=2)
    llm_config = AutoConfig.for_model(text, **{k: v for k, v in settings.items() if k != "model_type"})
    AutoModelForCausalLM.from_config(llm_config).save_pretrained(tmp_path / "llm")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    CLIPVisionModel(reference.vision_config).save_pretrained(tmp_path / "clip")
    model = ParrotForCausalLM.from_parts(str(tmp_path / "llm"), str(tmp_path / "clip"), image_token_id=IMAGE_TOKEN_ID)
    lm = model.language_model.eval()
    ids = torch.tensor([[1, 2, 3, 4, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, llm(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(lm(input_ids=ids[:, :3]).logits, lm(input_ids=ids).logits[:, :3])  # causal
    assert lm.config._attn_implementation == llm.config._attn_implementation
    # an implementation requested for the Parrot config still reaches the sub-configs
    config = ParrotConfig(text_config=llm.config, vision_config=reference.vision_config,
                          image_token_id=IMAGE_TOKEN_ID, attn_implementation="eager")
    assert config.text_config._attn_implementation == "eager"


def test_return_dict_false_gives_the_tuple():
    """return_dict=False (HF's convention, e.g. for tracing) used to fail: the LLM returned a tuple and forward read
    `.loss` from it."""
    model = ParrotForCausalLM(tiny_parrot_config()).eval()
    ids, mask, pixels = prompt_batch("right")
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, use_cache=False)
        tup = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, use_cache=False,
                    return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(out.to_tuple())
    for got, expected in zip(tup, out.to_tuple()):
        assert torch.equal(got, expected)
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(input_ids=ids, attention_mask=mask, pixel_values=pixels), tuple)


def test_half_precision_tower_and_llm_beside_float32_projector_and_moe():
    """A frozen tower (and LLM) kept in bfloat16 beside a float32 projector and MoE (LLaVA keeps its tower in half
    precision) used to fail with a dtype mismatch in the projector, then in the MoE's text attention."""
    model = ParrotForCausalLM(tiny_parrot_config()).eval()
    ids, mask, pixels = prompt_batch()
    model.vision_tower.bfloat16()
    model.language_model.bfloat16()
    reference = ParrotForCausalLM(tiny_parrot_config()).eval()  # float32 with the same (rounded) weights
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        ref = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert out.logits.dtype == torch.bfloat16 and out.router_probs.dtype == torch.float32
    torch.testing.assert_close(out.router_probs, ref.router_probs, rtol=0, atol=2e-2)
    torch.testing.assert_close(out.logits.float(), ref.logits, rtol=0, atol=5e-2)


def _zero3_world(monkeypatch, model):
    """Make `model` look partitioned by DeepSpeed ZeRO-3 in a 2-process run (the attribute ZeRO-3 gives parameters)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    for p in model.parameters():
        p.ds_id = 0


def test_text_only_batch_under_zero3_runs_the_visual_path(monkeypatch):
    """Under ZeRO-3 each module's forward all-gathers its weights (a collective): a process whose batch has no image
    skipped the tower, projector and MoE while the others ran them, and the collectives no longer matched (gloo aborts,
    NCCL hangs; the 2-process run is test_zero3_two_processes_with_and_without_images). Now it runs them on a blank
    image whose tokens join the sequence as an empty slice: same logits, zero gradients on the visual path."""
    model = ParrotForCausalLM(tiny_parrot_config())
    ids = torch.tensor([[1, 2, 3, 4], [6, 7, 8, 9]])
    labels = ids.clone()
    expected = model(input_ids=ids, labels=labels)
    _zero3_world(monkeypatch, model)
    called = []
    for part in (model.vision_tower, model.mm_projector, model.moe):
        part.register_forward_hook(lambda module, args, out: called.append(type(module).__name__))
    out = model(input_ids=ids, labels=labels)
    assert called == ["VisionTower", "Sequential", "ParrotMoEProjector"]
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    out.loss.backward()
    for name, p in [*model.mm_projector.named_parameters(), *model.moe.named_parameters()]:
        assert p.grad is not None and p.grad.abs().max() == 0, name
    called.clear()
    with torch.no_grad():
        model.eval().generate(input_ids=ids, max_new_tokens=2)
    assert called == ["VisionTower", "Sequential", "ParrotMoEProjector"]  # once, at the prefill


_ZERO3_SCRIPT = '''
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
import deepspeed
from deepspeed.utils import safe_get_full_grad
from tests.conftest import tiny_parrot_config, IMAGE_TOKEN_ID
from parrot.model import ParrotForCausalLM
deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = ParrotForCausalLM(tiny_parrot_config())
model.vision_tower.requires_grad_(False)
reference = ParrotForCausalLM(tiny_parrot_config())
reference.load_state_dict(model.state_dict())
batches = [dict(input_ids=torch.tensor([[1, IMAGE_TOKEN_ID, 3, 4]]), pixel_values=torch.randn(1, 3, 32, 32),
                labels=torch.tensor([[-100, -100, 3, 4]])),
           dict(input_ids=torch.tensor([[1, 2, 3, 4, 7]]), labels=torch.tensor([[-100, 2, 3, 4, 7]]))]
config = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3}}, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**6}}
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
engine.backward(engine(**batches[rank]).loss)  # rank 0: an image batch, rank 1: a text-only batch
(sum(reference(**b).loss for b in batches) / 2).backward()
worst = 0.0
for name, p in engine.module.named_parameters():
    if p.requires_grad:
        worst = max(worst, (safe_get_full_grad(p) - reference.get_parameter(name).grad).abs().max().item())
print(f"rank {{rank}} worst gradient difference {{worst:.3g}}", flush=True)
assert worst < 1e-5, worst
'''


@pytest.mark.slow
def test_zero3_two_processes_with_and_without_images(tmp_path):
    """2 processes under DeepSpeed ZeRO-3 (CPU, gloo), one with an image batch, one text-only: used to abort with a
    collective size mismatch; now their averaged gradients equal one process's on both batches."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "zero3_text_only.py"
    script.write_text(_ZERO3_SCRIPT.format(repo=str(repo)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("worst gradient difference") == 2


def test_pixel_values_of_no_image_is_a_text_only_batch():
    """pixel_values (0, 3, H, W) (a batch whose prompts hold no image) used to crash inside the CLIP tower."""
    model = ParrotForCausalLM(tiny_parrot_config()).eval()
    ids = torch.tensor([[1, 2, 3], [4, 6, 7]])
    none = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=none).logits, model(input_ids=ids).logits)
        assert torch.equal(model.generate(input_ids=ids, pixel_values=none, max_new_tokens=2, do_sample=False),
                           model.generate(input_ids=ids, max_new_tokens=2, do_sample=False))


def test_generate_max_length_counts_the_prompt_as_given():
    """max_length / min_length count the caller's input_ids (T tokens), not the merged embeddings HF receives (where
    each image takes num_image_tokens positions): max_length=T+3 gives what max_new_tokens=3 gives."""
    config = tiny_parrot_config()
    config.text_config.eos_token_id = None  # decode a fixed number of steps
    model = ParrotForCausalLM(config).eval()
    ids, mask, pixels = prompt_batch("left")
    T = ids.shape[1]
    expected = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                              min_new_tokens=3, do_sample=False)
    got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_length=T + 3,
                         min_length=T + 3, do_sample=False)
    assert expected.shape == (2, 3)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"max_length=6\) leaves no room after the 6-token prompt"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_length=T)


def test_projector_and_moe_start_from_pytorch_default_init_as_the_official_code():
    """The official Parrot (LLaVA) code creates the projector and the MoE after loading the LLM, so they keep
    nn.Linear's default init, U(-b, b) with b = 1/sqrt(fan_in) (bias too); the LLM's normal(0, 0.02) gave 4096-wide
    experts ~12x the official output at the start of stage 2. The LLM itself keeps HF's normal(0, initializer_range)."""
    import math

    torch.manual_seed(0)
    config = tiny_parrot_config(moe_intermediate_size=256)
    config.text_config.hidden_size = 128
    model = ParrotForCausalLM(config)

    def assert_uniform(tensor, bound, rel):
        assert float(tensor.abs().max()) <= bound
        assert float(tensor.std()) == pytest.approx(bound / math.sqrt(3), rel=rel)  # std of U(-b, b)

    linears = [m for m in model.mm_projector.modules() if isinstance(m, torch.nn.Linear)]
    linears.append(model.moe.router.gate)
    assert len(linears) == 3
    for linear in linears:
        bound = 1 / math.sqrt(linear.in_features)
        assert_uniform(linear.weight, bound, rel=0.1)
        if linear.bias is not None:
            assert_uniform(linear.bias, bound, rel=0.25)
    experts = model.moe.experts
    for weight, fan_in in ((experts.gate_proj, 128), (experts.up_proj, 128), (experts.down_proj, 256)):
        assert_uniform(weight, 1 / math.sqrt(fan_in), rel=0.05)
    q_proj = model.language_model.model.layers[0].self_attn.q_proj.weight
    assert float(q_proj.std()) == pytest.approx(config.text_config.initializer_range, rel=0.05)


def test_a_copied_model_still_gives_its_own_projector_pytorch_default_init():
    """Which modules get PyTorch's default init is decided at call time: a deep copy (or an unpickled model) has new
    module objects, and a set of module ids taken in __init__ named the original's, so re-initialising the copy's
    projector gave it the LLM's normal(0, 0.02)."""
    import copy
    import math

    torch.manual_seed(0)
    config = tiny_parrot_config()
    config.text_config.hidden_size = 128
    twin = copy.deepcopy(ParrotForCausalLM(config))
    linear = next(m for m in twin.mm_projector.modules() if isinstance(m, torch.nn.Linear))
    torch.nn.init.zeros_(linear.weight)
    twin._init_weights(linear)
    bound = 1 / math.sqrt(linear.in_features)
    assert float(linear.weight.abs().max()) <= bound
    assert float(linear.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    outside = torch.nn.Linear(128, 128)  # not part of the projector / MoE: HF's normal(0, initializer_range)
    twin._init_weights(outside)
    assert float(outside.weight.std()) == pytest.approx(config.text_config.initializer_range, rel=0.1)


def test_generate_with_an_moe_llm_configured_for_its_balance_loss():
    """An MoE LLM whose config sets output_router_logits (for the load-balancing loss in training; OLMoE / Qwen2-MoE
    checkpoints may) made generate() fail: transformers computed the loss at every decoding step and its cached
    steps' router logits did not match the attention mask. Generation now turns it off; tokens as without it."""
    moe_text = dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=32, vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    def build(output_router_logits: bool) -> ParrotForCausalLM:
        base = tiny_parrot_config()
        config = ParrotConfig(text_config=dict(moe_text, output_router_logits=output_router_logits),
                              vision_config=base.vision_config.to_dict(), image_token_id=IMAGE_TOKEN_ID, use_moe=True,
                              moe_num_experts=3, moe_intermediate_size=40)
        return ParrotForCausalLM(config).eval()

    torch.manual_seed(0)
    model, reference = build(True), build(False)
    reference.load_state_dict(model.state_dict())
    ids, mask, pixels = prompt_batch("left")
    got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    expected = reference.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                  do_sample=False)
    assert got.shape == (2, 4) and torch.equal(got, expected)
    assert model.config.text_config.output_router_logits  # the setting itself stays for training
