"""Stage-wise training: freezing per stage, LoRA folding, MoLE export, exact resume, atomic checkpoints, NaN stop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from parrot import fileio
from parrot.data.synthetic import make_conversation_records
from parrot.model.builder import TINY_RECIPE, build_tiny, save_pretrained
from parrot.train import NonFiniteLossError, TrainConfig, load_trained, train
from parrot.train import checkpoints
from parrot.train.config import build_parser, load_yaml_defaults, parse_args
from parrot.train.export import fold_lora
from parrot.train.trainer import ParrotTrainer

REPO = Path(__file__).resolve().parents[1]


def make_workspace(root: Path, n_records: int = 32) -> dict[str, Path]:
    """Synthetic caption + QA sets (32 px images), their registry, and a saved random tiny model."""
    data = root / "data"
    for stage in ("caption", "qa"):
        records = make_conversation_records(n_records, seed=0, stage=stage, image_dir=data / "images", image_size=32)
        (data / f"{stage}.json").write_text(json.dumps(records, ensure_ascii=False))
    registry = data / "registry.yaml"
    registry.write_text(yaml.safe_dump({"root": ".", "datasets": {
        "caption": {"path": "caption.json", "image_dir": "images"},
        "qa": {"path": "qa.json", "image_dir": "images"},
    }}))
    model, processor = build_tiny(TINY_RECIPE, seed=0)
    save_pretrained(model, processor, root / "init")
    return {"registry": registry, "init": root / "init"}


def config(ws: dict, out: Path, **overrides) -> TrainConfig:
    settings = dict(model=str(ws["init"]), data="caption", data_registry=str(ws["registry"]), output_dir=str(out),
                    per_device_batch_size=4, global_batch_size=8, max_steps=2, learning_rate=1e-2,
                    warmup_ratio=0.0, logging_steps=1, progress_bar=False, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def changed_parts(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """{part: (changed tensors, tensors)} by top-level module name."""
    assert before.keys() == after.keys()
    parts: dict[str, list[int]] = {}
    for key in before:
        part = key.split(".")[0]
        counts = parts.setdefault(part, [0, 0])
        counts[0] += int(not torch.equal(before[key], after[key]))
        counts[1] += 1
    return {part: tuple(c) for part, c in parts.items()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train_ws"))


@pytest.fixture(scope="module")
def stage1(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "run"
    train(config(ws, out))
    return out


# --- stages -------------------------------------------------------------------------------------------------
def test_stage1_trains_only_the_projector(ws, stage1, capsys):
    changes = changed_parts(weights(ws["init"]), weights(stage1))
    assert changes["mm_projector"][0] == changes["mm_projector"][1]  # every projector tensor moved
    for part in ("vision_tower", "language_model", "moe"):
        assert changes[part][0] == 0, part
    assert json.loads((stage1 / "config.json").read_text())["use_moe"] is False
    info = json.loads((stage1 / "parrot_training.json").read_text())
    assert info["stage"] == 1 and info["global_step"] == 2
    assert (stage1 / "loss_curve.png").stat().st_size > 1000


def test_start_table_counts_trainable_parameters(ws, tmp_path, capsys):
    train(config(ws, tmp_path / "run", max_steps=1))
    table = capsys.readouterr().out
    model, _ = load_trained(ws["init"])
    projector = sum(p.numel() for p in model.mm_projector.parameters())
    total = model.num_parameters()
    row = next(line for line in table.splitlines() if line.startswith("mm_projector"))
    assert row.split()[1:3] == [f"{projector:,}", f"{projector:,}"]
    row = next(line for line in table.splitlines() if line.startswith("all"))
    assert row.split()[1:3] == [f"{projector:,}", f"{total:,}"]


def test_stage2_full_trains_projector_moe_and_llm(ws, stage1, tmp_path):
    out = tmp_path / "s2"
    train(config(ws, out, stage=2, model=str(stage1), data="qa", tuning="full"))
    changes = changed_parts(weights(stage1), weights(out))
    assert changes["vision_tower"][0] == 0
    for part in ("mm_projector", "moe"):
        assert changes[part][0] == changes[part][1], part
    assert changes["language_model"][0] >= changes["language_model"][1] - 1  # all but possibly unused rows
    assert json.loads((out / "config.json").read_text())["use_moe"] is True


def test_stage2_lora_folds_adapters_into_targeted_linears_only(ws, stage1, tmp_path):
    out = tmp_path / "s2"
    train(config(ws, out, stage=2, model=str(stage1), data="qa", tuning="lora", lora_targets="q_proj,v_proj"))
    before, after = weights(stage1), weights(out)
    for key in before:
        if key.startswith("language_model."):
            targeted = key.endswith(("q_proj.weight", "v_proj.weight"))
            assert torch.equal(before[key], after[key]) != targeted, key
    assert changed_parts(before, after)["vision_tower"][0] == 0


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_stage2_ddp_survives_a_text_only_batch(tuning, tmp_path):
    """Plain DDP as the trainer configures it for stage 2: a batch without images leaves the projector and the MoE
    without gradients; the next step must still run (DDP checks the previous step's reduction)."""
    from tests.conftest import IMAGE_TOKEN_ID, tiny_parrot_config
    from parrot.model import ParrotForCausalLM
    from parrot.train.run import training_arguments
    from parrot.train.stages import apply_stage

    cfg = TrainConfig(stage=2, tuning=tuning, output_dir=str(tmp_path / "out"))
    find_unused = training_arguments(cfg, 1).ddp_find_unused_parameters
    torch.manual_seed(0)
    model = ParrotForCausalLM(tiny_parrot_config()).train()
    apply_stage(model, cfg)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
        with_image = dict(input_ids=torch.tensor([[1, IMAGE_TOKEN_ID, 3, 4]]), labels=torch.tensor([[-100, -100, 3, 4]]),
                          pixel_values=torch.randn(1, 3, 32, 32))
        text_only = dict(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[-100, -100, 3, 4]]))
        for batch in (with_image, text_only, with_image):
            ddp(**batch).loss.backward()
        assert next(model.mm_projector.parameters()).grad is not None  # the image steps reached it
    finally:
        torch.distributed.destroy_process_group()


def test_factorllm_routers_train_under_ddp(tmp_path):
    """FactorLLM's routers learn from the Prior-Approximate loss alone. Added inside the model call (the trainer's
    AuxLossHook), DDP with find_unused_parameters sees that path; added after the call, DDP marked the routers
    unused and failed when their gradients arrived."""
    from tests.conftest import IMAGE_TOKEN_ID, tiny_parrot_config
    from parrot.model import ParrotForCausalLM
    from parrot.train.run import training_arguments
    from parrot.train.stages import apply_stage
    from parrot.train.trainer import AuxLossHook

    cfg = TrainConfig(stage=2, tuning="factorllm", factorllm_experts=2, factorllm_top_k=1,
                      output_dir=str(tmp_path / "out"))
    torch.manual_seed(0)
    model = ParrotForCausalLM(tiny_parrot_config()).train()
    plan = apply_stage(model, cfg)
    model.register_forward_hook(AuxLossHook(plan.tuning_setup.aux_loss))
    routers = [p for name, p in model.named_parameters() if ".router." in name and p.requires_grad]
    assert routers
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=training_arguments(cfg, 1).ddp_find_unused_parameters)
        batch = dict(input_ids=torch.tensor([[1, IMAGE_TOKEN_ID, 3, 4]]), labels=torch.tensor([[-100, -100, 3, 4]]),
                     pixel_values=torch.randn(1, 3, 32, 32))
        for _ in range(2):
            model.zero_grad()
            ddp(**batch).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("tuning", ["mole", "factorllm"])
def test_aux_losses_under_reentrant_checkpointing_are_refused(tuning):
    """Reentrant activation checkpointing runs the routed layers under no_grad and recomputes them in the backward,
    where the aux losses (read from the layers after the forward) are lost: the routers trained without their
    balance / prior-approximate losses, silently. The trainer's hook refuses it; non-reentrant trains them."""
    from tests.conftest import IMAGE_TOKEN_ID, tiny_parrot_config
    from parrot.model import ParrotForCausalLM
    from parrot.train.stages import apply_stage
    from parrot.moe import collect_router_outputs, mole_aux_loss
    from parrot.moe.methods.tuning import train_steps
    from parrot.train.trainer import AuxLossHook

    batch = dict(input_ids=torch.tensor([[1, IMAGE_TOKEN_ID, 3, 4]]), labels=torch.tensor([[-100, -100, 3, 4]]),
                 pixel_values=torch.randn(1, 3, 32, 32))
    for reentrant in (True, False):
        cfg = TrainConfig(stage=2, tuning=tuning, factorllm_experts=2, factorllm_top_k=1, output_dir="unused")
        torch.manual_seed(0)
        model = ParrotForCausalLM(tiny_parrot_config()).train()
        plan = apply_stage(model, cfg)
        aux_loss = plan.tuning_setup.aux_loss if plan.tuning_setup is not None else (
            lambda: mole_aux_loss(collect_router_outputs(model.language_model)))
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # the methods' own loop (router_lens / factorllm commands) refuses it too
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                train_steps(model, [batch], steps=1, lr=1e-3, aux_loss=aux_loss)
        model.register_forward_hook(AuxLossHook(aux_loss))
        if reentrant:
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                model(**batch)
            continue
        model(**batch).loss.backward()
        routers = [p for name, p in model.named_parameters() if ".router." in name and p.requires_grad]
        assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


@pytest.mark.parametrize("records, per_device, processes", [(30, 4, 2), (32, 4, 2), (37, 3, 4)])
def test_epoch_end_repeats_counts_what_accelerate_repeats(records, per_device, processes):
    """The number the trainer warns about equals the records accelerate's sharded sampler (even_batches, HF
    Trainer's default) hands out twice in one epoch."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from parrot.train.run import epoch_end_repeats

    seen = []
    for rank in range(processes):
        batches = BatchSampler(SequentialSampler(range(records)), per_device, drop_last=False)
        for batch in BatchSamplerShard(batches, num_processes=processes, process_index=rank, even_batches=True):
            seen.extend(batch)
    assert sorted(set(seen)) == list(range(records))  # nothing dropped
    assert epoch_end_repeats(records, per_device, processes) == len(seen) - records
    assert epoch_end_repeats(records, per_device, 1) == 0  # one process is not sharded: a shorter last batch


def test_fold_lora_matches_peft_merge():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    state = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    folded = fold_lora(state, scaling=6 / 2)
    merged = model.merge_and_unload().state_dict()
    assert folded.keys() == merged.keys()
    for key in merged:
        torch.testing.assert_close(folded[key], merged[key])


def test_stage2_mole_keeps_llm_base_and_saves_adapter(ws, stage1, tmp_path):
    out = tmp_path / "s2"
    train(config(ws, out, stage=2, model=str(stage1), data="qa", tuning="mole", router="dynmole",
                 lora_targets="q_proj,o_proj", mole_experts=3, mole_fused="never"))
    before, after = weights(stage1), weights(out)
    changes = changed_parts(before, after)
    assert changes["language_model"][0] == 0 and changes["vision_tower"][0] == 0
    assert changes["mm_projector"][0] == changes["mm_projector"][1]
    adapter = load_file(str(out / "mole_adapter.safetensors"))
    assert "model.layers.1.self_attn.q_proj.router.gate.weight" in adapter
    model, processor = load_trained(out)
    from parrot.moe import MoLELinear

    layers = [m for m in model.modules() if isinstance(m, MoLELinear)]
    assert len(layers) == 2 * 2  # 2 layers x (q_proj, o_proj)
    assert {m.fused for m in layers} == {"never"}  # --mole-fused travels with the saved adapter config
    state = {f"language_model.{k}": v for k, v in adapter.items()}
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    # A run cannot start from it: loaded without its adapter, the model would lose what this run trained.
    with pytest.raises(ValueError, match=rf"--model {out} holds a model trained with a mole adapter"):
        train(config(ws, tmp_path / "again", stage=2, model=str(out), data="qa", tuning="full"))


# --- resume and checkpoints ---------------------------------------------------------------------------------
class _Crash(RuntimeError):
    pass


class CrashAtStep(TrainerCallback):
    """Simulates an interruption when `step` begins (after the checkpoint of the previous step is out)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise _Crash(f"simulated crash at step {self.step}")


def test_resume_continues_exactly(ws, stage1, tmp_path):
    # Stage 2 with MoLE dropout: the resumed run must restore the data order *and* the RNG stream.
    common = dict(stage=2, model=str(stage1), data="qa", tuning="mole", router="topk", lora_dropout=0.2,
                  lora_targets="q_proj", mole_experts=2, mole_top_k=1, max_steps=6, save_steps=3,
                  learning_rate=3e-3)
    full = train(config(ws, tmp_path / "full", keep_last=1, **common))
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "full")] == ["checkpoint-6"]

    with pytest.raises(_Crash):
        train(config(ws, tmp_path / "cut", **common), callbacks=[CrashAtStep(4)])
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "cut")] == ["checkpoint-3"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(ws, tmp_path / "cut", **common))
    resumed = train(config(ws, tmp_path / "cut", resume=True, **common))

    assert [s for s, _ in full.losses] == [1, 2, 3, 4, 5, 6]
    assert dict(resumed.losses) == dict(full.losses)  # steps 1-3 restored from the checkpoint, 4-6 retrained
    for key, value in weights(tmp_path / "full").items():
        assert torch.equal(value, weights(tmp_path / "cut")[key]), key
    assert torch.equal(load_file(str(tmp_path / "full" / "mole_adapter.safetensors"))[
        "model.layers.0.self_attn.q_proj.experts.lora_B"],
        load_file(str(tmp_path / "cut" / "mole_adapter.safetensors"))[
        "model.layers.0.self_attn.q_proj.experts.lora_B"])


def test_resume_follows_the_new_save_and_logging_steps(ws, tmp_path):
    """--save-steps / --logging-steps may change on --resume (train_config.json records the new ones): the resumed
    steps save and log at the new cadence, not at the one HF restores from the checkpoint's trainer state."""
    common = dict(max_steps=6, keep_last=0)
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        train(config(ws, out, save_steps=2, logging_steps=1, **common), callbacks=[CrashAtStep(3)])
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    save, log = 3, 2
    resumed = train(config(ws, out, resume=True, save_steps=save, logging_steps=log, **common))

    steps = range(3, 7)  # the resumed steps; every checkpoint step is also a logging step (LogAtCheckpointsCallback)
    saved = [step for step in steps if step % save == 0]
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"] + [f"checkpoint-{s}" for s in saved]
    assert [step for step, _ in resumed.losses] == [1, 2] + [s for s in steps if s % log == 0 or s in saved]
    state = json.loads((out / f"checkpoint-{saved[-1]}" / "trainer_state.json").read_text())
    assert (state["save_steps"], state["logging_steps"]) == (save, log)
    assert {k: json.loads((out / "train_config.json").read_text())[k] for k in ("save_steps", "logging_steps")} == \
        {"save_steps": save, "logging_steps": log}


def test_crash_during_save_leaves_no_published_checkpoint(ws, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    original = ParrotTrainer._save_rng_state

    def failing_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        original(self, output_dir)

    monkeypatch.setattr(ParrotTrainer, "_save_rng_state", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(config(ws, out, max_steps=3, save_steps=1, keep_last=2))
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-1"]
    assert (out / ".staging-checkpoint-2").is_dir()  # the half-written one never got the final name
    monkeypatch.setattr(ParrotTrainer, "_save_rng_state", original)
    result = train(config(ws, out, max_steps=3, save_steps=1, keep_last=2, resume=True))
    assert result.global_step == 3
    assert not (out / ".staging-checkpoint-2").exists()
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]


def test_checkpoint_helpers(tmp_path):
    for step in (10, 2, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / ".staging-checkpoint-40").mkdir()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert checkpoints.latest_checkpoint(tmp_path).name == "checkpoint-30"
    assert [p.name for p in checkpoints.rotate(tmp_path, 2)] == ["checkpoint-2"]
    staged = checkpoints.staging_dir(tmp_path, 40)
    (staged / "weights").write_text("w")
    fileio.publish(staged, checkpoints.checkpoint_dir(tmp_path, 40))
    assert (tmp_path / "checkpoint-40" / "weights").read_text() == "w" and not staged.exists()
    assert checkpoints.rotate(tmp_path, 0) == []
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30",
                                                                       "checkpoint-40"]
    assert checkpoints.latest_checkpoint(tmp_path / "missing") is None


def test_resume_without_checkpoint_is_an_error(ws, tmp_path):
    with pytest.raises(FileNotFoundError, match="no published checkpoint"):
        train(config(ws, tmp_path / "empty", resume=True))


# --- NaN stop -----------------------------------------------------------------------------------------------
class PoisonAfterStep(TrainerCallback):
    """Fills one parameter with NaN once `step` has finished, so step + 1 computes a NaN loss."""

    def __init__(self, step: int, parameter: str):
        self.step, self.parameter = step, parameter

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                dict(model.named_parameters())[self.parameter].fill_(float("nan"))


def test_nan_loss_stops_with_the_step(ws, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3\b") as err:
        train(config(ws, tmp_path / "run", max_steps=5),
              callbacks=[PoisonAfterStep(2, "mm_projector.0.weight")])
    assert "router" not in str(err.value)  # stage 1 has no router
    assert not (tmp_path / "run" / "model.safetensors").exists()  # nothing saved after the NaN


def test_nan_loss_names_the_first_nonfinite_router(ws, stage1, tmp_path):
    poisoned = "language_model.model.layers.1.self_attn.q_proj.router.gate.weight"
    with pytest.raises(NonFiniteLossError) as err:
        train(config(ws, tmp_path / "run", stage=2, model=str(stage1), data="qa", tuning="mole", router="dynmole",
                     lora_targets="q_proj,o_proj", mole_experts=2, max_steps=4),
              callbacks=[PoisonAfterStep(1, poisoned)])
    message = str(err.value)
    assert "optimizer step 2" in message
    assert "language_model.model.layers.1.self_attn.q_proj (MoLE router)" in message


# --- configuration / CLI ------------------------------------------------------------------------------------
def test_help_documents_every_setting():
    text = build_parser().format_help()
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_paper_configs_hold_the_paper_hyperparameters():
    s1 = parse_args(["--config", str(REPO / "configs/train/parrot7b_stage1.yaml")])
    s2 = parse_args(["--config", str(REPO / "configs/train/parrot7b_stage2.yaml"), "--learning-rate", "1e-5"])
    assert (s1.stage, s1.learning_rate, s1.global_batch_size, s1.epochs) == (1, 1e-3, 256, 1.0)
    assert (s2.stage, s2.global_batch_size, s2.epochs, s2.tuning) == (2, 128, 1.0, "full")
    assert s2.learning_rate == 1e-5  # the command line wins over the YAML (which holds 2e-5)
    assert load_yaml_defaults(REPO / "configs/train/parrot7b_stage2.yaml")["learning_rate"] == 2e-5


def test_unknown_yaml_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown training setting 'learning_rat'"):
        load_yaml_defaults(bad)


def test_default_output_folder_is_per_stage(tmp_path):
    """A stage-2 run without --output-dir must not write into (or be refused by) the stage-1 folder."""
    assert TrainConfig(stage=1).output_dir == "runs/stage1"
    assert TrainConfig(stage=2).output_dir == "runs/stage2"
    assert parse_args(["--stage", "2"]).output_dir == "runs/stage2"
    yaml_file = tmp_path / "s2.yaml"
    yaml_file.write_text("stage: 2\n")
    assert parse_args(["--config", str(yaml_file)]).output_dir == "runs/stage2"
    assert TrainConfig(stage=2, output_dir=str(tmp_path)).output_dir == str(tmp_path)


def test_mole_fused_setting_is_checked():
    with pytest.raises(ValueError, match="mole_fused"):
        TrainConfig(stage=2, tuning="mole", mole_fused="always")


def test_max_samples_draws_from_the_whole_mix_before_the_checks(ws, tmp_path):
    """--max-samples N: N records of the whole mix, both datasets in proportion (not the first N, all captions), and
    only those are checked (the bad-data report counts 8 images checked, not 64)."""
    from parrot.model.builder import load_pretrained
    from parrot.train.run import BAD_DATA_REPORT, build_train_dataset

    _, processor = load_pretrained(ws["init"])
    dataset, report = build_train_dataset(config(ws, tmp_path, data="caption|qa", max_samples=8), processor, tmp_path)
    assert sorted(r.dataset for r in dataset.records) == ["caption"] * 4 + ["qa"] * 4
    assert report.checked == 8 and json.loads((tmp_path / BAD_DATA_REPORT).read_text())["counts"]["checked"] == 8


def test_text_only_records_keep_model_max_length_and_image_records_give_up_the_visual_tokens(ws, tmp_path):
    """The run truncates as LLaVA does: a text-only record at model_max_length text tokens, a record with an image
    num_image_tokens - 1 fewer (its <image> takes num_image_tokens positions in the LLM). Reference: the template's
    truncation at those lengths, from the processor's own settings."""
    from parrot.data.templates import get_template, llava_to_messages
    from parrot.model.builder import load_pretrained
    from parrot.train.run import build_train_dataset

    _, processor = load_pretrained(ws["init"])
    tokenizer, settings = processor.tokenizer, processor.settings
    template = get_template(settings.template)
    length, image_budget = settings.model_max_length, settings.model_max_length - (settings.num_image_tokens - 1)
    assert settings.num_image_tokens > 1

    def full_length(turns):
        return len(template.tokenize(llava_to_messages(turns), tokenizer, 10 ** 6)[0])

    def conversation(prefix):  # short exchanges until it no longer fits the image budget (but fits the model)
        turns = []
        while not turns or full_length(turns) <= image_budget:
            turns += [{"from": "human", "value": f"{prefix if not turns else ''}Colour {len(turns)}?"},
                      {"from": "gpt", "value": "Blue."}]
        assert full_length(turns) <= length
        return turns

    data = tmp_path / "data"
    data.mkdir()
    image = next((Path(ws["registry"]).parent / "images").iterdir())
    records = [{"id": "text", "conversations": conversation("")},
               {"id": "img", "image": str(image), "conversations": conversation("<image>\n")}]
    (data / "d.json").write_text(json.dumps(records))
    (data / "reg.yaml").write_text(yaml.safe_dump({"root": ".", "datasets": {"d": {"path": "d.json"}}}))
    dataset, _ = build_train_dataset(config(ws, tmp_path / "out", data="d", data_registry=str(data / "reg.yaml")),
                                     processor, tmp_path / "out")
    for item, record, budget in ((dataset[0], records[0], length), (dataset[1], records[1], image_budget)):
        ids, labels = template.tokenize(llava_to_messages(record["conversations"]), tokenizer, budget)
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels, record["id"]
    assert len(dataset[0]["input_ids"]) > image_budget  # the text-only record was not cut to the image budget
    assert len(dataset[1]["input_ids"]) + settings.num_image_tokens - 1 <= length  # the image record fits the LLM


def test_global_batch_must_divide(ws, tmp_path):
    with pytest.raises(ValueError, match="not a multiple"):
        train(config(ws, tmp_path / "run", global_batch_size=6, per_device_batch_size=4))


@pytest.mark.parametrize("router", ["topk", "dynmole", "gwmoe", "mor"])
def test_stage2_mole_each_router_trains_and_writes_diagnostics(ws, stage1, tmp_path, router, capsys):
    """A tiny stage-2 MoLE run per router: the loss falls and the router diagnostics + heat map are written; the
    router scalars of each logging step are printed and saved with its loss (loss_history.json), as the statistics
    router_stats.json records for that step give them."""
    from parrot.moe import RouterStatsTracker
    from parrot.train.callbacks import format_duration

    out = tmp_path / router
    result = train(config(ws, out, stage=2, model=str(stage1), data="qa", tuning="mole", router=router,
                          lora_targets="q_proj,v_proj", mole_experts=3, max_steps=12, per_device_batch_size=8,
                          global_batch_size=8, learning_rate=5e-3, logging_steps=3))
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0], losses
    stats = json.loads((out / "router_stats.json").read_text())
    layers = {record["layer"] for record in stats["records"]}
    assert layers == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    steps = sorted({record["step"] for record in stats["records"]})
    assert steps == [1, 3, 6, 9, 12]
    for record in stats["records"]:
        assert abs(sum(record["load"]) - record["mean_active"]) < 1e-4  # load: share of tokens per expert
    assert (out / "expert_load.png").stat().st_size > 1000
    tracker = RouterStatsTracker.from_dict(stats)
    history = json.loads((out / "loss_history.json").read_text())
    assert [entry["step"] for entry in history] == steps
    printed = capsys.readouterr().err
    for entry in history:
        expected = tracker.scalars(entry["step"])
        assert expected and {k: v for k, v in entry.items() if k.startswith("router/")} == pytest.approx(expected)
        line = next(line for line in printed.splitlines() if f"step {entry['step']}/12 |" in line)
        assert (f"router H {expected['router/entropy_mean']:.3f}, max load {expected['router/max_load_ratio']:.2f}"
                in line)
        if entry["step"] > 1:  # the ETA printed is the one saved (none at the first step: no step timed yet)
            assert f"ETA {format_duration(entry['eta_s'])}" in line


def test_stage2_gwmoe_with_a_fixed_threshold_skips_the_calibration(ws, stage1, tmp_path, monkeypatch):
    """--gw-threshold (the official scripts' fixed threshold, nats) is every GW-MoE router's threshold, saved with the
    adapter; no calibration pass runs. A threshold that is not a positive number is refused by name."""
    from parrot.moe.routers import GWMoERouter
    from parrot.train import run

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran although --gw-threshold was set")

    monkeypatch.setattr(run, "_calibrate_gwmoe", no_calibration)
    out = tmp_path / "gw"
    train(config(ws, out, stage=2, model=str(stage1), data="qa", tuning="mole", router="gwmoe", gw_threshold=0.7,
                 lora_targets="q_proj", mole_experts=3, per_device_batch_size=8, global_batch_size=8))
    model, _ = load_trained(out)
    routers = [m for m in model.modules() if isinstance(m, GWMoERouter)]
    assert len(routers) == 2 and all(float(r.threshold) == pytest.approx(0.7) for r in routers)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="gw_threshold must be a finite number > 0"):
            config(ws, out, stage=2, tuning="mole", router="gwmoe", gw_threshold=bad)
    # the official 1.6 nats is for 8 experts: over 4 no router entropy reaches it (ln 4 = 1.386)
    with pytest.raises(ValueError, match=r"gw_threshold=1.6 nats is not below ln\(mole_experts=4\) = 1.3863"):
        config(ws, out, stage=2, tuning="mole", router="gwmoe", gw_threshold=1.6, mole_experts=4)
    assert config(ws, out, stage=2, tuning="mole", router="gwmoe", gw_threshold=1.6, mole_experts=8).gw_threshold == 1.6


def test_stage2_mole_trains_under_torch_compile(ws, stage1, tmp_path):
    """--torch-compile (HF Trainer's torch_compile): the compiled model trains with the uncompiled run's losses.
    Backend aot_eager traces through AOTAutograd without code generation (Inductor's modes are for GPUs)."""
    from torch._dynamo.utils import counters

    runs = {}
    counters.clear()
    for compiled in (False, True):
        extra = dict(torch_compile="default", torch_compile_backend="aot_eager") if compiled else {}
        runs[compiled] = train(config(ws, tmp_path / f"compiled-{compiled}", stage=2, model=str(stage1), data="qa",
                                      tuning="mole", router="topk", lora_targets="q_proj,v_proj", mole_experts=3,
                                      max_steps=3, **extra))
    assert counters["stats"]["unique_graphs"] > 0  # the model did run compiled
    plain, compiled = ([loss for _, loss in runs[c].losses] for c in (False, True))
    assert len(plain) == len(compiled) == 3
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="torch_compile"):
        TrainConfig(torch_compile="fast")
    torch._dynamo.reset()


# --- output folders, resume settings, saved-model loading (review fixes) -----------------------------------------
def test_fresh_run_refuses_a_folder_with_a_finished_model(ws, stage1, tmp_path, capsys):
    """Training `full` over a finished run would leave that run's adapter files beside the new model."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(stage1, out)
    with pytest.raises(FileExistsError, match=rf"{out} already holds a finished model \(parrot_training\.json"):
        train(config(ws, out, stage=2, model=str(stage1), data="qa", tuning="full"))
    assert torch.equal(weights(out)["mm_projector.0.weight"], weights(stage1)["mm_projector.0.weight"])  # untouched
    from parrot.train.__main__ import main as train_main  # the command says so in one line, exit 2

    assert train_main(["--stage", "2", "--model", str(stage1), "--data", "qa", "--data-registry", str(ws["registry"]),
                       "--output-dir", str(out)]) == 2
    assert f"error: {out} already holds a finished model" in capsys.readouterr().err


def _finished_copy(stage1: Path, out: Path, tuning) -> Path:
    import shutil

    shutil.copytree(stage1, out)
    info = json.loads((out / "parrot_training.json").read_text())
    (out / "parrot_training.json").write_text(json.dumps({**info, "tuning": tuning}))
    return out


def test_load_trained_applies_only_the_recorded_adapter(stage1, tmp_path):
    from safetensors.torch import save_file

    from parrot.moe import MoLELinear

    stale = _finished_copy(stage1, tmp_path / "full", "full")  # a full run over an old MoLE run's files
    (stale / "mole_config.json").write_text(json.dumps({"target_modules": ["q_proj"], "num_experts": 2}))
    save_file({}, str(stale / "mole_adapter.safetensors"))
    with pytest.raises(ValueError, match=r"records tuning 'full', but .* also holds \['mole_config\.json', "
                                         r"'mole_adapter\.safetensors'\]"):
        load_trained(stale)

    lost = _finished_copy(stage1, tmp_path / "mole", "mole")  # the recorded adapter's files are gone
    with pytest.raises(FileNotFoundError, match=r"records tuning 'mole', but its adapter file\(s\) "
                                                r"\['mole_config\.json', 'mole_adapter\.safetensors'\] are missing"):
        load_trained(lost)

    model, _ = load_trained(_finished_copy(stage1, tmp_path / "lora", "lora"))  # folded: no adapter files
    assert not any(isinstance(m, MoLELinear) for m in model.modules())


@pytest.mark.parametrize("tuning", ["mole", "perft-r", "factorllm"])
def test_a_run_refuses_to_start_from_a_model_with_an_adapter(ws, stage1, tmp_path, tuning):
    """A MoLE / PERFT / FactorLLM output keeps its adapter beside the base weights. A stage-2 run given that folder
    as --model used to load the base weights alone (only warning that the folder was no stage-1 output) and train
    on, silently dropping what that run had trained."""
    from parrot.train.export import ADAPTER_FILES, adapter_kind_of

    kind = adapter_kind_of(tuning)
    done = _finished_copy(stage1, tmp_path / "done", tuning)
    info = json.loads((done / "parrot_training.json").read_text())
    (done / "parrot_training.json").write_text(json.dumps({**info, "stage": 2}))
    for name in ADAPTER_FILES[kind]:
        (done / name).write_text("{}")  # their presence is what counts here
    out = tmp_path / "again"
    with pytest.raises(ValueError, match=rf"--model {done} holds a model trained with a {kind} adapter "
                                         rf"\({', '.join(ADAPTER_FILES[kind])} beside the base weights\)"):
        train(config(ws, out, stage=2, model=str(done), data="qa", tuning="full"))
    assert not (out / "model.safetensors").exists()


def test_llm_and_vision_are_refused_where_they_would_be_ignored(ws, stage1, tmp_path):
    """--llm / --vision only reach a real-scale recipe in stage 1; with a tiny recipe a run used to train a random
    tiny model, and with a saved directory the folder's own model, without a word about the paths given."""
    cases = [(1, TINY_RECIPE, "a tiny recipe"), (1, ws["init"], "a saved model directory"),
             (2, stage1, "a saved model directory")]
    for i, (stage, model, what) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(ValueError, match=rf"--llm and --vision would be ignored: --model {model} is {what}"):
            train(config(ws, out, stage=stage, model=str(model), llm=str(tmp_path / "llm"),
                         vision=str(tmp_path / "clip")))
        assert not (out / "model.safetensors").exists()
    with pytest.raises(ValueError, match=r"^--vision would be ignored"):
        train(config(ws, tmp_path / "run", stage=2, model=str(stage1), vision=str(tmp_path / "clip")))


_AFTER_ZERO3 = """
import json, sys
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from parrot.train import TrainConfig, load_trained, train
settings, first, second, zero3 = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
train(TrainConfig(output_dir=first, deepspeed=zero3, **settings))
print("zero3 flag after the run:", is_deepspeed_zero3_enabled())
model, _ = load_trained(first)
weight = model.get_input_embeddings().weight
print("load_trained:", weight.dtype, tuple(weight.shape), hasattr(weight, "ds_id"))
train(TrainConfig(output_dir=second, **settings))  # the next run of the process, without DeepSpeed
print("second run done")
"""


@pytest.mark.slow
def test_a_zero3_run_leaves_the_models_built_after_it_whole(ws, stage1, tmp_path):
    """train() under ZeRO-3 used to leave transformers' process-wide ZeRO-3 flag on: load_trained of its result gave
    an empty (partitioned) bfloat16 model, and the next run in the process (stage 1 then stage 2 in one script, a
    sweep) loaded its --model partitioned: it failed without DeepSpeed ("'weight' must be 2-D") and, under ZeRO-3,
    trained and saved a bfloat16 model from the float32 stage-1 output."""
    import os
    import subprocess
    import sys

    settings = dataclasses.asdict(config(ws, tmp_path, stage=2, model=str(stage1), data="qa", max_steps=1,
                                         global_batch_size=4, bf16=True))
    del settings["output_dir"], settings["deepspeed"]
    first, second = tmp_path / "zero3", tmp_path / "after"
    launcher_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}  # one process, own rendezvous
    proc = subprocess.run([sys.executable, "-c", _AFTER_ZERO3, json.dumps(settings), str(first), str(second),
                           str(REPO / "configs/deepspeed/zero3.json")], cwd=REPO, capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"), timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    model_tokens = json.loads((stage1 / "config.json").read_text())["text_config"]["vocab_size"]
    hidden = json.loads((stage1 / "config.json").read_text())["text_config"]["hidden_size"]
    assert "zero3 flag after the run: False" in proc.stdout
    assert f"load_trained: torch.float32 ({model_tokens}, {hidden}) False" in proc.stdout
    assert "second run done" in proc.stdout
    assert {t.dtype for t in weights(second).values()} == {torch.float32}


def test_resume_refuses_changed_settings(ws, stage1, tmp_path):
    out = tmp_path / "run"
    saved = config(ws, out, stage=2, model=str(stage1), data="qa", tuning="mole", router="topk", lora_alpha=16.0,
                   lora_targets="q_proj", mole_experts=3, max_steps=6, save_steps=3)
    (out / "checkpoint-3").mkdir(parents=True)  # what an interrupted run leaves
    saved.save(out / "train_config.json")
    changed = dataclasses.replace(saved, resume=True, router="dynmole", lora_alpha=64.0, seed=7)
    with pytest.raises(ValueError, match="differ") as err:
        train(changed)
    message = str(err.value)
    for diff in ("router: 'topk' -> 'dynmole'", "lora_alpha: 16.0 -> 64.0", "seed: 0 -> 7"):
        assert diff in message
    assert json.loads((out / "train_config.json").read_text())["router"] == "topk"  # not overwritten

    # logging, progress bar, save cadence, retention and the folder may change on resume; nothing else may
    harmless = dataclasses.replace(saved, resume=True, logging_steps=5, progress_bar=True, save_steps=2, keep_last=0,
                                   output_dir=str(tmp_path / "moved"))
    assert harmless.resume_differences(saved.to_dict()) == []
    assert dataclasses.replace(saved, max_steps=8).resume_differences(saved.to_dict()) == ["max_steps: 6 -> 8"]
    (out / "train_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_config.json is missing"):
        train(dataclasses.replace(saved, resume=True))


def test_load_pretrained_refuses_missing_tensors(ws, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from parrot.model.builder import load_pretrained

    broken = tmp_path / "broken"
    shutil.copytree(ws["init"], broken)
    state = weights(broken)
    state["mm_projector.9.weight"] = state.pop("mm_projector.0.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: \['mm_projector\.0\.weight'\]; "
                                         r"unexpected keys: \['mm_projector\.9\.weight'\]"):
        load_pretrained(broken)
    load_pretrained(ws["init"])  # a complete save (tied lm_head, rotary buffers) loads without complaint


def test_load_pretrained_refuses_a_processor_of_another_model(ws, tmp_path):
    """A parrot_processor.json saved for another model (here: 5 visual tokens per image, the model makes more)
    would under-count prompt lengths: refused, naming the field and both values."""
    import shutil

    from parrot.model.builder import load_pretrained

    other = tmp_path / "other"
    shutil.copytree(ws["init"], other)
    settings = json.loads((other / "parrot_processor.json").read_text())
    model_tokens = settings["num_image_tokens"]
    settings.update(num_image_tokens=5, image_size=settings["image_size"] * 2)
    (other / "parrot_processor.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=rf"do not match config.json .*image_size: .*num_image_tokens: 5 vs "
                                         rf"{model_tokens}"):
        load_pretrained(other)
    # Unreadable files are a ValueError naming the folder too (what the demo and the evaluator report cleanly).
    for name, damage in (("config.json", lambda path: path.write_text("{not json")),
                         ("model.safetensors", lambda path: path.write_bytes(path.read_bytes()[:1000]))):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(ws["init"], broken)
        damage(broken / name)
        with pytest.raises(ValueError, match=rf"{broken}: cannot load the saved model"):
            load_pretrained(broken)


# --- settings checks (review fixes) ---------------------------------------------------------------------------
def test_yaml_values_get_the_setting_types(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text('learning_rate: 2e-3\nlora_rank: "16"\nprogress_bar: "false"\nbf16: "YES"\nepochs: 1\n'
                    "ceft_ranking: null\nstage: 2\nlora_alpha: 32\n")
    values = load_yaml_defaults(good)
    assert values == {"learning_rate": 2e-3, "lora_rank": 16, "progress_bar": False, "bf16": True, "epochs": 1.0,
                      "ceft_ranking": None, "stage": 2, "lora_alpha": 32.0}
    assert type(values["learning_rate"]) is float and type(values["epochs"]) is float
    cfg = parse_args(["--config", str(good)])
    assert (cfg.learning_rate, cfg.lora_rank, cfg.progress_bar) == (2e-3, 16, False)


@pytest.mark.parametrize("line,expected", [
    ("learning_rate: fast", r"learning_rate: expected float, got 'fast'"),
    ("lora_rank: 16.5", r"lora_rank: expected int, got 16\.5"),
    ("max_steps: '1e3'", r"max_steps: expected int, got '1e3'"),
    ("progress_bar: maybe", r"progress_bar: expected bool \(true/false/yes/no/1/0\), got 'maybe'"),
    ("bf16: 1", r"bf16: expected bool \(true/false/yes/no/1/0\), got 1"),
    ("tuning: no", r"tuning: expected str, got False"),  # YAML 1.1 reads a bare `no` as false
    ("lr_scheduler: null", r"lr_scheduler: expected str, got null"),
    ("router: switch", r"router: expected one of \('topk', 'dynmole', 'gwmoe', 'mor'\), got 'switch'"),
    ("stage: 3", r"stage: expected one of \(1, 2\), got 3"),
])
def test_yaml_value_of_the_wrong_type_is_named(tmp_path, line, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.yaml: {expected}"):
        load_yaml_defaults(bad)


def test_warmup_ratio_must_be_a_share_of_the_steps():
    for ratio in (1.0, 2.0, -0.1):
        with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\)"):
            TrainConfig(warmup_ratio=ratio)
    assert TrainConfig(warmup_ratio=0.5).warmup_ratio == 0.5


@pytest.mark.parametrize("tuning", ["lora", "mole"])
def test_every_lora_target_must_match_a_module(tuning, tmp_path):
    from tests.conftest import tiny_parrot_config
    from parrot.model import ParrotForCausalLM
    from parrot.train.stages import apply_stage

    cfg = TrainConfig(stage=2, tuning=tuning, lora_targets="q_proj,nonexistent_proj,v_prj", mole_fused="never",
                      output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"\['nonexistent_proj', 'v_prj'\] match no"):
        apply_stage(ParrotForCausalLM(tiny_parrot_config()), cfg)


def test_mole_top_k_above_the_expert_count_is_refused(tmp_path):
    from tests.conftest import tiny_parrot_config
    from parrot.model import ParrotForCausalLM
    from parrot.train.stages import apply_stage

    cfg = TrainConfig(stage=2, tuning="mole", mole_experts=2, mole_top_k=5, mole_fused="never",
                      output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"top_k=5 exceeds num_experts=2"):
        apply_stage(ParrotForCausalLM(tiny_parrot_config()), cfg)


@pytest.mark.parametrize("script,yaml_stage", [("train_stage1.sh", 2), ("train_stage2.sh", 1)])
def test_stage_script_refuses_a_config_of_the_other_stage(tmp_path, script, yaml_stage):
    import os
    import subprocess
    import sys

    cfg = tmp_path / "other.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"stage: {yaml_stage}\noutput_dir: {out}\nmax_steps: 1\n")
    env = {**os.environ, "PYTHON": sys.executable}
    for flag in (["--config", str(cfg)], [f"--config={cfg}"]):
        proc = subprocess.run(["bash", str(REPO / "scripts" / script), *flag], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2
        assert f"{cfg} sets stage: {yaml_stage}; run it with scripts/train_stage{yaml_stage}.sh" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), "--stage", str(yaml_stage)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "do not pass --stage" in proc.stderr
    assert not out.exists()  # nothing trained


def _launch(tmp_path: Path, script: str, *args: str, cwd: Path, gpus: int = 0, check: bool = True):
    """Runs scripts/<script> from `cwd` with a stand-in interpreter ($PYTHON) and a stand-in `deepspeed` launcher
    beside it: the launcher's GPU probe gets `gpus`, its YAML stage check runs on this interpreter, and the training
    command writes the directory it was started in, its program and its arguments to a file. -> (process, directory,
    arguments of parrot.train)."""
    import os
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "deepspeed"):
        stub = bin_dir / name
        stub.write_text('#!/bin/sh\ncase "$1" in\n  -c) echo "$FAKE_GPUS" ;;\n  -) exec "$REAL_PYTHON" "$@" ;;\n'
                        '  *) printf "%s\\n" "$PWD" "${0##*/}" "$@" > "$ARGV_FILE" ;;\nesac\n')
        stub.chmod(0o755)
    argv_file = tmp_path / "argv.txt"
    argv_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": str(bin_dir / "python"), "REAL_PYTHON": sys.executable, "FAKE_GPUS": str(gpus),
           "ARGV_FILE": str(argv_file)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    if not check:
        return proc, None, None
    assert proc.returncode == 0, proc.stderr
    directory, launched, *argv = argv_file.read_text().splitlines()
    assert launched == ("deepspeed" if gpus else "python")  # GPUs: the deepspeed launcher; CPU: one process
    return proc, Path(directory), argv[argv.index("parrot.train") + 1:]


def test_deepspeed_none_overrides_a_yaml_deepspeed_config(tmp_path):
    """`--deepspeed none` (what the scripts' --no-deepspeed passes) trains without DeepSpeed even where the YAML sets
    a config, as both parrot7b_stage*.yaml do; any case, or an empty value, too."""
    zero2 = REPO / "configs/deepspeed/zero2.json"
    yaml_file = tmp_path / "ds.yaml"
    yaml_file.write_text(f"stage: 1\ndeepspeed: {zero2}\n")
    assert parse_args(["--config", str(yaml_file)]).deepspeed == str(zero2)
    for off in ("none", "None", "NONE", "", " none "):
        assert parse_args(["--config", str(yaml_file), "--deepspeed", off]).deepspeed is None, repr(off)
    for paper in ("parrot7b_stage1.yaml", "parrot7b_stage2.yaml"):
        path = REPO / "configs/train" / paper
        assert load_yaml_defaults(path)["deepspeed"]
        assert parse_args(["--config", str(path), "--deepspeed", "none"]).deepspeed is None, paper


@pytest.mark.parametrize("gpus", [0, 2], ids=["cpu", "gpus"])
def test_no_deepspeed_overrides_the_configs_deepspeed_in_the_scripts(tmp_path, monkeypatch, gpus):
    """scripts/train_stage2.sh --no-deepspeed with parrot7b_stage2.yaml (deepspeed: zero3.json): the run it starts
    has no DeepSpeed config, on GPUs (no default config added either) and on CPU."""
    _, directory, train_args = _launch(tmp_path, "train_stage2.sh", "--no-deepspeed", "--config",
                                       "configs/train/parrot7b_stage2.yaml", cwd=REPO, gpus=gpus)
    monkeypatch.chdir(directory)
    assert parse_args(train_args).deepspeed is None
    _, _, with_deepspeed = _launch(tmp_path, "train_stage2.sh", "--config", "configs/train/parrot7b_stage2.yaml",
                                   cwd=REPO, gpus=gpus)
    assert parse_args(with_deepspeed).deepspeed == "configs/deepspeed/zero3.json"  # the YAML's (or the default)
    proc, _, _ = _launch(tmp_path, "train_stage2.sh", "--help", cwd=REPO, check=False)
    assert "--no-deepspeed   train without DeepSpeed" in proc.stdout
    # a YAML's own deepspeed: is not replaced by the script's default (stage 2: zero3) on GPUs
    own = tmp_path / "own.yaml"
    own.write_text("stage: 2\ndeepspeed: configs/deepspeed/zero2.json\n")
    _, _, with_own = _launch(tmp_path, "train_stage2.sh", "--config", str(own), cwd=REPO, gpus=gpus)
    assert parse_args(with_own).deepspeed == "configs/deepspeed/zero2.json"


def test_scripts_resolve_relative_paths_in_the_callers_directory(tmp_path, monkeypatch):
    """scripts/_launch.sh runs training in the repository: a relative path typed elsewhere keeps its meaning there
    (a file of the caller's directory, an output folder to create), while a path found only under the repository
    (configs/...) is taken from there; both `--opt value` and `--opt=value`; the caller's --deepspeed config is
    used, with no default added."""
    import shutil

    caller = tmp_path / "elsewhere"
    (caller / "data").mkdir(parents=True)
    (caller / "my.yaml").write_text("stage: 1\nmax_steps: 1\n")
    shutil.copy(REPO / "configs/deepspeed/zero2.json", caller / "ds.json")
    _, directory, args = _launch(tmp_path, "train_stage1.sh", "--config", "my.yaml", "--output-dir", "out",
                                 "--data-root=data", "--model", "configs/tiny.yaml",
                                 "--data-registry=configs/datasets.yaml", "--deepspeed", "ds.json", cwd=caller,
                                 gpus=2)
    assert directory == REPO
    assert args == ["--stage", "1", "--config", str(caller / "my.yaml"), "--output-dir", str(caller / "out"),
                    f"--data-root={caller / 'data'}", "--model", "configs/tiny.yaml",
                    "--data-registry=configs/datasets.yaml", "--deepspeed", str(caller / "ds.json")]
    monkeypatch.chdir(directory)
    cfg = parse_args(args)
    assert (cfg.max_steps, cfg.output_dir, cfg.deepspeed) == (1, str(caller / "out"), str(caller / "ds.json"))
    # the stage check reads the caller's config too (it used to look for my.yaml in the repository and skip)
    (caller / "other.yaml").write_text("stage: 2\n")
    proc, _, _ = _launch(tmp_path, "train_stage1.sh", "--config=other.yaml", cwd=caller, check=False)
    assert proc.returncode == 2 and f"{caller / 'other.yaml'} sets stage: 2" in proc.stderr
    # typed in the repository, relative paths stay as typed (train_config.json records them so)
    _, _, args = _launch(tmp_path, "train_stage1.sh", "--output-dir", "runs/x", "--config",
                         "configs/train/tiny_stage1.yaml", cwd=REPO)
    assert args == ["--stage", "1", "--output-dir", "runs/x", "--config", "configs/train/tiny_stage1.yaml"]


def test_resume_compares_path_settings_as_paths(tmp_path, monkeypatch):
    """'runs/s1/' and 'runs/s1' (or a relative and an absolute spelling) name one folder: a --resume accepts
    either; another folder is still a difference."""
    from parrot.train.run import check_resume_settings

    monkeypatch.chdir(tmp_path)
    first = TrainConfig(stage=2, model=str(tmp_path / "s1"), data_root="data", data_registry="./reg/../reg.yaml",
                        output_dir=str(tmp_path / "out"))
    first.save(tmp_path / "train_config.json")
    same = dataclasses.replace(first, resume=True, model=str(tmp_path / "s1") + "/", data_root=str(tmp_path / "data"),
                               data_registry="reg.yaml")
    assert same.resume_differences(first.to_dict()) == []
    check_resume_settings(same, tmp_path / "train_config.json")
    other = dataclasses.replace(same, model=str(tmp_path / "s2"), data_root=None)
    assert other.resume_differences(first.to_dict()) == [f"model: {first.model!r} -> {other.model!r}",
                                                         "data_root: 'data' -> None"]


def _other_value(f: dataclasses.Field):
    """A value of the setting's type other than its default."""
    if f.metadata.get("choices"):
        return next(choice for choice in f.metadata["choices"] if choice != f.default)
    if f.default is None and str(f.type).startswith("float"):
        return 0.5
    if f.default is None or isinstance(f.default, str):
        return "other"
    if isinstance(f.default, bool):
        return not f.default
    return f.default + 1 if isinstance(f.default, int) else f.default / 2


def test_a_run_saved_before_a_setting_existed_resumes_where_it_trains_alike():
    """A train_config.json written before a setting existed lacks it: resuming compares the setting with the value
    that trains as that run did (`SETTINGS_ADDED_LATER`), and only where the run uses the setting, so adding a
    PERFT-R or GW-MoE setting does not lock every older run out of --resume."""
    from parrot.train.config import SETTINGS_ADDED_LATER

    for tuning, extra in (("full", {}), ("lora", {}), ("mole", {"router": "gwmoe"}), ("perft-e", {})):
        now = TrainConfig(stage=2, tuning=tuning, **extra)
        saved = {k: v for k, v in now.to_dict().items() if k not in SETTINGS_ADDED_LATER}
        assert now.resume_differences(saved) == [], tuning
    perft = TrainConfig(stage=2, tuning="perft-r")  # the pooled balance loss is new: that run trained per layer
    saved = {k: v for k, v in perft.to_dict().items() if k != "perft_balance_coef"}
    assert perft.resume_differences(saved) == ["perft_balance_coef: (not saved: the run trained as None does) -> 0.01"]
    assert TrainConfig(stage=2, tuning="perft-r", perft_balance_coef=None).resume_differences(saved) == []
    fixed = TrainConfig(stage=2, tuning="mole", router="gwmoe", gw_threshold=1.0)
    saved = {k: v for k, v in fixed.to_dict().items() if k != "gw_threshold"}
    assert fixed.resume_differences(saved) == ["gw_threshold: (not saved: the run trained as None does) -> 1.0"]
    saved = {k: v for k, v in TrainConfig(stage=2).to_dict().items() if k != "lora_rank"}  # not added later: strict
    assert TrainConfig(stage=2).resume_differences(saved) == ["lora_rank: (not saved) -> 8"]


def test_stage1_refuses_stage2_settings(tmp_path, monkeypatch, capsys):
    """Stage 1 trains the projector only (`apply_stage`): a stage-2 setting given there (--tuning mole --router gwmoe)
    would be ignored while train_config.json records it, so each one off its default is refused by name. The
    stage-1 configs still load, and a stage-1 --resume does not compare settings that train nothing there."""
    with pytest.raises(ValueError) as err:
        TrainConfig(stage=1, tuning="mole", router="gwmoe")
    assert "stage 1" in str(err.value) and "tuning='mole'" in str(err.value) and "router='gwmoe'" in str(err.value)
    with pytest.raises(SystemExit):
        parse_args(["--stage", "1", "--tuning", "mole", "--router", "gwmoe"])
    assert "tuning='mole', router='gwmoe'" in capsys.readouterr().err
    from parrot.train.config import STAGE2_FIELDS

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert STAGE2_FIELDS <= fields.keys()
    for name in sorted(STAGE2_FIELDS):
        value = _other_value(fields[name])
        with pytest.raises(ValueError, match=rf"stage 1 .*{name}={value!r}"):
            TrainConfig(stage=1, **{name: value})
        assert getattr(TrainConfig(stage=2, **{name: value}), name) == value
    # the stage-2 help texts name the stage or the stage-2 method each setting belongs to
    assert not [name for name in STAGE2_FIELDS if not any(word in fields[name].metadata["help"] for word in (
        "stage 2", "LoRA", "MoLE", "GW-MoE", "PERFT", "FactorLLM", "CEFT"))]
    monkeypatch.chdir(REPO)  # parrot7b_stage1.yaml names its DeepSpeed config relative to the repository
    stage1_configs = sorted((REPO / "configs/train").glob("*stage1*.yaml"))
    assert stage1_configs
    for path in stage1_configs:
        assert parse_args(["--config", str(path)]).stage == 1, path
    saved = {**TrainConfig(stage=1).to_dict(), "tuning": "mole", "router": "gwmoe"}  # recorded before the refusal
    assert TrainConfig(stage=1).resume_differences(saved) == []
    assert TrainConfig(stage=2).resume_differences({**saved, "stage": 2}) == ["tuning: 'mole' -> 'full'",
                                                                             "router: 'gwmoe' -> 'topk'"]


def test_tf32_reaches_the_trainer_and_the_paper_configs_ask_for_it(tmp_path):
    """--tf32 (the official recipe's --tf32 True) becomes TrainingArguments(tf32=True); off leaves PyTorch's setting
    alone (HF's tf32=False would switch it off process-wide). Without a TF32-capable GPU HF refuses it by name."""
    from parrot.train.run import training_arguments

    assert training_arguments(TrainConfig(output_dir=str(tmp_path)), 1).tf32 is None
    for stage in (1, 2):
        assert load_yaml_defaults(REPO / f"configs/train/parrot7b_stage{stage}.yaml")["tf32"] is True
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--tf32 requires Ampere"):
            training_arguments(TrainConfig(output_dir=str(tmp_path), tf32=True), 1)


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_reaches_the_trainer_without_a_deprecation_warning(tmp_path, enabled):
    import warnings

    from parrot.train.run import training_arguments

    cfg = TrainConfig(model="configs/tiny.yaml", output_dir=str(tmp_path), gradient_checkpointing=enabled)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        args = training_arguments(cfg, processes=1)
    assert args.gradient_checkpointing is enabled


@pytest.mark.parametrize("setting", [
    dict(epochs=0.0), dict(epochs=-2.0), dict(epochs=float("nan"), max_steps=2), dict(max_grad_norm=float("nan")),
    dict(max_grad_norm=-1.0), dict(weight_decay=-5.0), dict(weight_decay=float("inf")), dict(learning_rate=0.0),
    dict(stage=2, tuning="lora", lora_alpha=float("nan")), dict(stage=2, tuning="lora", lora_dropout=1.0),
])
def test_training_numbers_out_of_range_are_refused_by_name(setting):
    """NaN passes every comparison, epochs 0 publishes an untrained model, NaN clipping silently turns clipping off:
    each is refused naming the setting."""
    name = next(k for k in setting if k not in ("stage", "tuning", "max_steps"))
    settings = dict(stage=1, output_dir="unused", max_steps=-1)
    settings.update(setting)
    with pytest.raises(ValueError, match=name):
        TrainConfig(**settings)
    assert TrainConfig(stage=1, output_dir="unused", epochs=0.0, max_steps=3).epochs == 0.0  # max_steps decides
