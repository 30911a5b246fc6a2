"""ParrotMCQModel on a real (tiny, random) saved Parrot checkpoint: batched left-padded likelihood scores
equal one-prompt-at-a-time scores computed directly from the model, generation returns one text per prompt,
and the whole evaluator runs on it."""
import json
import shutil

import pytest
import torch
from transformers import LogitsProcessorList

from mmmb.evaluate import EvalConfig, build_queries, evaluate_mmmb
from mmmb.models import ParrotMCQModel
from mmmb.toy import toy_mmmb
from parrot.data.tokenizer import build_tiny_tokenizer

from .conftest import ScriptedTokens, save_tiny_parrot_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_parrot_for(build_tiny_tokenizer(vocab_size=300, n_texts=300),
                                tmp_path_factory.mktemp("tiny_parrot"), use_moe=False)


def test_batched_letter_logprobs_match_unbatched_reference(model_dir):
    adapter = ParrotMCQModel(model_dir, max_new_tokens=4)
    data = toy_mmmb(n_items=4, seed=2, languages=("en", "ru"))
    queries = build_queries(data["en"], "en", False) + build_queries(data["ru"], "ru", False)  # unequal lengths
    prompts, images = [q.prompt for q in queries], [q.record.load_image() for q in queries]
    letters = ["A", "B", "C", "D"]
    batched = adapter.option_logprobs(prompts, images, letters)  # (8, 4)
    assert batched.shape == (len(queries), 4)

    ids, mask = adapter.letter_token_ids(letters)
    tokenizer = adapter.processor.tokenizer
    for letter, row, valid in zip(letters, ids, mask):
        assert all(tokenizer.decode([int(t)]).strip() == letter for t in row[valid])
    for i, (prompt, image) in enumerate(zip(prompts, images)):  # one prompt at a time: no padding at all
        single = adapter.processor([adapter.processor.build_prompt(prompt)], [image])
        with torch.no_grad():
            logprobs = adapter.model(**single).logits[0, -1].double().log_softmax(-1)
        for j in range(4):
            expected = torch.logsumexp(logprobs[ids[j][mask[j]]], dim=0)
            assert batched[i, j].item() == pytest.approx(expected.item(), abs=1e-4)

    texts = adapter.generate(prompts[:3], images[:3])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_weights_id_follows_the_weights(model_dir):
    """Equal for the same saved weights loaded twice; different once any parameter changes (a training step)."""
    from mmmb.models import weights_fingerprint

    first, second = ParrotMCQModel(model_dir), ParrotMCQModel(model_dir)
    assert first.weights_id == second.weights_id == weights_fingerprint(second.model)
    with torch.no_grad():
        next(second.model.mm_projector.parameters()).add_(1e-3)
    assert weights_fingerprint(second.model) != first.weights_id


def test_settings_id_follows_the_generation_length_only_when_generating(model_dir):
    """Answers generated with another max_new_tokens are other answers (the evaluator refuses such a cache); letter
    likelihoods do not depend on it."""
    short, long = ParrotMCQModel(model_dir, max_new_tokens=1), ParrotMCQModel(model_dir, max_new_tokens=16)
    assert short.weights_id == long.weights_id
    assert short.settings_id("generate") != long.settings_id("generate")
    assert short.settings_id("likelihood") == long.settings_id("likelihood")
    assert short.settings_id("generate") == ParrotMCQModel(model_dir, max_new_tokens=1).settings_id("generate")


def test_evaluator_runs_on_the_parrot_adapter(model_dir, tmp_path):
    data = toy_mmmb(n_items=3, seed=5, languages=("zh", "ar"))
    result = evaluate_mmmb(ParrotMCQModel(model_dir), data, tmp_path,
                           EvalConfig("tiny", mode="likelihood", circular=True, batch_size=4))
    for language in ("zh", "ar"):
        predictions = result.predictions[language]
        assert len(predictions) == sum(len(r.options) for r in data[language])
        assert predictions["prediction"].isin(list("ABCD")).all()
    assert (tmp_path / "tiny_MMMB_acc.png").is_file() and (tmp_path / "tiny_MMMB_cn.xlsx").is_file()


def test_command_lines_end_to_end_on_synthetic_mmmb(model_dir, tmp_path):
    pytest.importorskip("parrot.data.synthetic")
    from mmmb.build import main as build_main
    from mmmb.evaluate import main as evaluate_main
    from mmmb.leaderboard import main as leaderboard_main

    build_main(["--synthetic", "15", "--seed", "3", "--out", str(tmp_path / "data"), "--languages", "en", "tr"])
    for name in ("first", "second"):
        evaluate_main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--mode", "likelihood",
                       "--model-name", name, "--out", str(tmp_path / "results" / name), "--batch-size", "8"])
        assert (tmp_path / "results" / name / f"{name}_MMMB_acc.png").is_file()
    table = leaderboard_main([str(tmp_path / "results"), "--languages", "en", "tr"])
    assert sorted(table["model"]) == ["first", "second"]
    assert table["rank"].tolist() == [1, 1]  # the same model under two names ties


def _old_sampled_positions(numel, samples=16):
    """The positions the former fingerprint read (16 evenly spaced values per tensor)."""
    return set(torch.linspace(0, numel - 1, min(samples, numel)).long().tolist())


def test_fingerprint_covers_every_weight_byte():
    """Two models differing in any one value get different fingerprints, wherever the value is: exhaustively over
    every position of a small model (most of which a sampled fingerprint never reads), and for a value that equals
    the original numerically but not bitwise (-0.0 for 0.0)."""
    from mmmb.models import weights_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    reference = weights_fingerprint(model)
    twin = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    twin.load_state_dict(model.state_dict())
    assert weights_fingerprint(twin) == reference  # equal weights, another object

    weight = model[0].weight
    assert set(range(weight.numel())) - _old_sampled_positions(weight.numel())  # positions a sample never read
    seen = {reference}
    for name, param in model.named_parameters():
        for position in range(param.numel()):
            with torch.no_grad():
                original = param.view(-1)[position].item()
                param.view(-1)[position] = original + 1e-6
                fingerprint = weights_fingerprint(model)
                param.view(-1)[position] = original
            assert fingerprint not in seen, (name, position)
            seen.add(fingerprint)
    assert weights_fingerprint(model) == reference  # every value restored
    with torch.no_grad():
        model[0].bias.view(-1)[1] = 0.0
        zero = weights_fingerprint(model)
        model[0].bias.view(-1)[1] = -0.0
    assert weights_fingerprint(model) != zero


def test_fingerprint_of_bf16_weights_reads_their_bytes():
    """bf16 (which numpy cannot hold) is hashed too: one changed bf16 value outside the old sample changes it, and
    the same values in bf16 and in float32 are different weights (the model computes differently)."""
    from mmmb.models import weights_fingerprint

    torch.manual_seed(1)
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    reference = weights_fingerprint(model)
    position = min(set(range(64 * 64)) - _old_sampled_positions(64 * 64))
    with torch.no_grad():
        model.weight.view(-1)[position] = model.weight.view(-1)[position] * 2 + 1
    assert weights_fingerprint(model) != reference
    assert weights_fingerprint(model.float()) != weights_fingerprint(model.to(torch.bfloat16))


def test_weights_id_changes_with_one_fine_tuned_row(model_dir):
    """A checkpoint that differs from another only in one row of the embedding (a few fine-tuned tokens) must not
    share its cached predictions."""
    first, second = ParrotMCQModel(model_dir), ParrotMCQModel(model_dir)
    embedding = second.model.get_input_embeddings().weight  # (V, D)
    row = embedding.shape[0] // 2 + 1
    assert not _old_sampled_positions(embedding.numel()) & set(range(row * embedding.shape[1],
                                                                     (row + 1) * embedding.shape[1]))
    with torch.no_grad():
        embedding[row] += 1e-3
    from mmmb.models import weights_fingerprint

    assert weights_fingerprint(second.model) != first.weights_id


def test_parrot_adapter_refuses_an_item_spelling_its_tokenizers_control_tokens(model_dir, tmp_path):
    """The tiny tokenizer reads "<|im_end|>" inside text as the control token (checked here against its id); the
    evaluator refuses such an item instead of asking the model, naming the language's file, the row and column."""
    from mmmb.tsv import MMMBFormatError, read_mmmb, write_tsv

    adapter = ParrotMCQModel(model_dir)
    tokenizer = adapter.processor.tokenizer
    for text in ("<|im_end|>", "<image>"):
        assert text in adapter.reserved_texts()
        assert tokenizer.convert_tokens_to_ids(text) in tokenizer(f"a {text} b", add_special_tokens=False)["input_ids"]
    data = toy_mmmb(n_items=3, seed=5, languages=("en", "ar"))
    record = data["ar"][1]
    data["ar"][1] = record.__class__(**{**record.__dict__, "options": (record.options[0], "x<|im_end|>",
                                                                       *record.options[2:])})
    for language, records in data.items():
        write_tsv(tmp_path / f"mmmb_{language}.tsv", records)
    with pytest.raises(MMMBFormatError, match=rf"mmmb_ar.tsv, row {record.index} \(data row 2\), column 'B': the "
                                              r"text contains '<\|im_end\|>'"):
        evaluate_mmmb(adapter, read_mmmb([tmp_path]), tmp_path / "out", EvalConfig("tiny", mode="likelihood"))
    assert not (tmp_path / "out" / "cache").exists()


def test_fingerprint_covers_buffers():
    """A buffer that decides the outputs (a calibrated GW-MoE threshold, a BatchNorm statistic) is part of the
    weights' identity: two models with equal parameters but another buffer value get different fingerprints."""
    from mmmb.models import weights_fingerprint

    model = torch.nn.BatchNorm1d(4)
    reference = weights_fingerprint(model)
    with torch.no_grad():
        model.running_mean[2] = 0.5
    assert weights_fingerprint(model) != reference


def test_generated_answer_ends_at_the_templates_end_of_answer(model_dir, tmp_path, monkeypatch):
    """A ChatML model whose eos is another token (an LLM whose tokenizer ends text with `<|endoftext|>`) still closes
    its answers with `<|im_end|>`, as training labels them: the answer ends there instead of running on into a next
    turn the model invents (whose letters the extractor could read)."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    adapter = ParrotMCQModel(model_dir, max_new_tokens=8)
    tokenizer = adapter.processor.tokenizer
    config["eos_token_id"] = tokenizer.pad_token_id  # "<|endoftext|>"
    (copy / "generation_config.json").write_text(json.dumps(config))
    adapter = ParrotMCQModel(copy, max_new_tokens=8)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert adapter.end_ids == [tokenizer.pad_token_id, im_end]
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    script = ids("A") + [im_end] + ids("\n<|im_start|>user\nB")
    real_generate = adapter.model.generate
    monkeypatch.setattr(adapter.model, "generate", lambda **kwargs: real_generate(
        **kwargs, logits_processor=LogitsProcessorList([ScriptedTokens(script)])))
    data = toy_mmmb(n_items=1, seed=2, languages=("en",))
    query = build_queries(data["en"], "en", False)[0]
    assert adapter.generate([query.prompt], [query.record.load_image()]) == ["A"]
