"""ParrotMCQModel on a real (tiny, random) saved Parrot checkpoint: batched left-padded likelihood scores
equal one-prompt-at-a-time scores computed directly from the model, generation returns one text per prompt,
and the whole evaluator runs on it."""
import pytest
import torch

from mmmb.evaluate import EvalConfig, build_queries, evaluate_mmmb
from mmmb.models import ParrotMCQModel
from mmmb.toy import toy_mmmb
from parrot.data.tokenizer import build_tiny_tokenizer

from .conftest import save_tiny_parrot_for


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
