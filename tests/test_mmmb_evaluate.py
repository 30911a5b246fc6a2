"""mmmb.evaluate on stub models whose answers are known: vanilla and circular scores, likelihood mode,
resume after a crash, output files. Expected scores are computed here by plain loops over the items."""
import json
import re

import pandas as pd
import pytest
import torch

from mmmb.evaluate import EvalConfig, evaluate_mmmb
from mmmb.languages import ANSWER_INSTRUCTION, LANGUAGES
from mmmb.models import MCQModel
from mmmb.toy import toy_mmmb
from mmmb.tsv import OPTION_LETTERS

SENTENCES = {  # how the stub phrases "the answer is <letter>" in each language
    "en": "The answer is {}.", "zh": "答案是{}", "pt": "A resposta é {}", "ar": "الإجابة هي {}",
    "tr": "Cevap {}", "ru": "Ответ: {}",
}


class KnownAnswersStub(MCQModel):
    """Answers from the prompt text alone. Per item (found by its question line) a behaviour:
    "know" → picks the option text of the true answer wherever it is; "first" → always letter A;
    "mumble" → an output with no answer. Records every prompt it is asked."""

    def __init__(self, behaviour: dict[str, str], true_text: dict[str, str]):
        self.behaviour, self.true_text, self.asked = behaviour, true_text, []

    def _choice(self, prompt: str) -> str | None:
        lines = prompt.split("\n")
        options = dict(re.match(r"^([A-Z])\. (.*)$", line).groups() for line in lines[1:-1])
        kind = self.behaviour[lines[0]]
        if kind == "know":
            return next(letter for letter, text in options.items() if text == self.true_text[lines[0]])
        return "A" if kind == "first" else None

    def generate(self, prompts, images):
        assert len(prompts) == len(images) and all(image.size == (8, 8) for image in images)
        self.asked.extend(prompts)
        outputs = []
        for prompt in prompts:
            language = next(lang for lang, text in ANSWER_INSTRUCTION.items() if prompt.endswith(text))
            choice = self._choice(prompt)
            outputs.append(SENTENCES[language].format(choice) if choice else "I am not sure.")
        return outputs

    def option_logprobs(self, prompts, images, letters):
        self.asked.extend(prompts)
        scores = torch.zeros(len(prompts), len(letters))
        scores[:, -1] = 5.0  # a letter beyond a 3-option item's options must never be chosen
        for row, prompt in enumerate(prompts):
            choice = self._choice(prompt) or "B"
            scores[row, letters.index(choice)] = 10.0
        return scores.log_softmax(dim=-1)


class CrashAfter(MCQModel):
    def __init__(self, model, batches):
        self.model, self.batches_left = model, batches

    def generate(self, prompts, images):
        if self.batches_left == 0:
            raise RuntimeError("simulated crash")
        self.batches_left -= 1
        return self.model.generate(prompts, images)


@pytest.fixture()
def setup():
    data = toy_mmmb(n_items=12, seed=1, languages=LANGUAGES)
    behaviour, true_text = {}, {}
    for lang, records in data.items():
        for k, record in enumerate(records):
            behaviour[record.question] = ("know", "first", "mumble")[(k + LANGUAGES.index(lang)) % 3]
            true_text[record.question] = record.options[record.answer_position]
    return data, behaviour, true_text


def _expected(data, behaviour, circular):
    """Per-language accuracy (%) and no-answer counts by direct reasoning about the stub."""
    accuracy, no_answer = {}, {}
    for lang, records in data.items():
        hits = 0
        for record in records:
            kind = behaviour[record.question]
            if kind == "know":
                hits += 1
            elif kind == "first":
                # vanilla: right iff the answer is A; circular: "A" every rotation is right in only one of them
                hits += (not circular) and record.answer == "A"
        accuracy[lang] = 100.0 * hits / len(records)
        no_answer[lang] = sum(behaviour[r.question] == "mumble" for r in records)
    return accuracy, no_answer


@pytest.mark.parametrize("circular", [False, True])
def test_generation_scores_match_known_answers(tmp_path, setup, circular):
    data, behaviour, true_text = setup
    model = KnownAnswersStub(behaviour, true_text)
    result = evaluate_mmmb(model, data, tmp_path, EvalConfig("stub", circular=circular, batch_size=5))
    accuracy, no_answer = _expected(data, behaviour, circular)
    n_prompts = sum(len(r.options) if circular else 1 for records in data.values() for r in records)
    assert len(model.asked) == n_prompts
    for lang in LANGUAGES:
        assert result.table.loc["Overall", lang] == pytest.approx(accuracy[lang])
    assert result.average == pytest.approx(sum(accuracy.values()) / 6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["no_answer"] == no_answer and summary["average"] == pytest.approx(result.average)
    # per-category numbers from the items table
    en = data["en"]
    for category in {r.category for r in en}:
        members = [r for r in en if r.category == category]
        hits = sum(behaviour[r.question] == "know" or (not circular and behaviour[r.question] == "first"
                                                       and r.answer == "A") for r in members)
        assert result.table.loc[category, "en"] == pytest.approx(100.0 * hits / len(members))


def test_output_files_follow_vlmevalkit_names(tmp_path, setup):
    data, behaviour, true_text = setup
    evaluate_mmmb(KnownAnswersStub(behaviour, true_text), data, tmp_path, EvalConfig("stub", circular=True))
    for code in ("en", "cn", "pt", "ar", "tr", "ru"):
        predictions = pd.read_excel(tmp_path / f"stub_MMMB_{code}.xlsx")
        assert {"index", "question", "A", "B", "answer", "category", "prediction", "hit"} <= set(predictions.columns)
        n_rows = sum(len(r.options) for r in data["en"])
        assert len(predictions) == n_rows and len(pd.read_csv(tmp_path / f"stub_MMMB_{code}.tsv", sep="\t")) == n_rows
        assert (predictions["index"] >= 1_000_000).sum() == n_rows - len(data["en"])  # VLMEvalKit circular ids
    table = pd.read_csv(tmp_path / "stub_MMMB_acc.csv", index_col=0)
    assert list(table.columns) == [*LANGUAGES, "Avg"] and table.index[0] == "Overall"
    assert "| Overall |" in (tmp_path / "stub_MMMB_acc.md").read_text()
    assert (tmp_path / "stub_MMMB_acc.png").read_bytes()[:4] == b"\x89PNG"


def test_prompt_is_in_the_item_language_with_lettered_options(tmp_path, setup):
    data, behaviour, true_text = setup
    model = KnownAnswersStub(behaviour, true_text)
    evaluate_mmmb(model, {"ar": data["ar"][:1]}, tmp_path, EvalConfig("stub"))
    record = data["ar"][0]
    expected = "\n".join([record.question, *(f"{l}. {t}" for l, t in zip(OPTION_LETTERS, record.options)),
                          ANSWER_INSTRUCTION["ar"]])
    assert model.asked == [expected]


def test_likelihood_mode_masks_missing_letters(tmp_path, setup):
    data, behaviour, true_text = setup
    model = KnownAnswersStub(behaviour, true_text)
    result = evaluate_mmmb(model, data, tmp_path, EvalConfig("stub", mode="likelihood", batch_size=4))
    for lang, records in data.items():
        # "mumble" items fall back to B in the stub's scores; "first" picks A; letter D never wins on 3 options
        hits = sum(behaviour[r.question] == "know" or (behaviour[r.question] == "first" and r.answer == "A")
                   or (behaviour[r.question] == "mumble" and r.answer == "B") for r in records)
        assert result.table.loc["Overall", lang] == pytest.approx(100.0 * hits / len(records))
        predictions = result.predictions[lang]
        assert all(p in OPTION_LETTERS[:n] for p, n in zip(predictions["prediction"],
                                                            predictions[["A", "B", "C", "D"]].notna().sum(axis=1)))


def test_resume_after_crash_gives_the_same_scores(tmp_path, setup):
    data, behaviour, true_text = setup
    config = EvalConfig("stub", circular=True, batch_size=7)
    reference = evaluate_mmmb(KnownAnswersStub(behaviour, true_text), data, tmp_path / "clean", config)

    crashing = KnownAnswersStub(behaviour, true_text)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_mmmb(CrashAfter(crashing, batches=9), data, tmp_path / "resumed", config)
    cache_dir = tmp_path / "resumed" / "cache" / "generate"
    done = sum(len(p.read_text().splitlines()) for p in cache_dir.glob("*.jsonl"))
    total = sum(len(r.options) for records in data.values() for r in records)
    assert done == len(crashing.asked) and 0 < done < total  # every finished batch was flushed
    interrupted = cache_dir / "zh.jsonl"  # the language the crash hit; it also cut a write short
    complete_lines = interrupted.read_text().splitlines()
    assert 0 < len(complete_lines) < sum(len(r.options) for r in data["zh"])
    with interrupted.open("a") as handle:
        handle.write('{"key": "1000:1", "index": 10')

    resumed_model = KnownAnswersStub(behaviour, true_text)
    resumed = evaluate_mmmb(resumed_model, data, tmp_path / "resumed", config)
    assert len(resumed_model.asked) == total - done  # only the missing prompts were asked
    assert set(resumed_model.asked).isdisjoint(crashing.asked)
    assert interrupted.read_text().splitlines()[: len(complete_lines)] == complete_lines
    pd.testing.assert_frame_equal(resumed.table, reference.table)
    for lang in LANGUAGES:
        keys = [json.loads(line)["key"] for line in (cache_dir / f"{lang}.jsonl").read_text().splitlines()]
        assert len(keys) == len(set(keys)) == sum(len(r.options) for r in data[lang])

    # a third run asks nothing at all
    idle = KnownAnswersStub(behaviour, true_text)
    evaluate_mmmb(idle, data, tmp_path / "resumed", config)
    assert idle.asked == []


def test_cache_of_other_weights_under_the_same_name_is_refused(tmp_path, setup):
    """A retrained model saved under the same name: its weights id differs, so the old predictions are not reused."""
    data, behaviour, true_text = setup
    data = {"en": data["en"]}
    evaluate_mmmb(KnownAnswersStub(behaviour, true_text), data, tmp_path, EvalConfig("stub", model_weights="w1"))
    same = KnownAnswersStub(behaviour, true_text)
    evaluate_mmmb(same, data, tmp_path, EvalConfig("stub", model_weights="w1"))
    assert same.asked == []  # the same weights: everything from the cache
    retrained = KnownAnswersStub(behaviour, true_text)
    with pytest.raises(ValueError, match=r"other weights saved as 'stub' .*'w1'.*now 'w2'.*--fresh"):
        evaluate_mmmb(retrained, data, tmp_path, EvalConfig("stub", model_weights="w2"))
    assert retrained.asked == []


def test_cache_from_other_data_is_refused(tmp_path, setup):
    data, behaviour, true_text = setup
    evaluate_mmmb(KnownAnswersStub(behaviour, true_text), {"en": data["en"]}, tmp_path, EvalConfig("stub"))
    other = toy_mmmb(n_items=12, seed=99, languages=("en",))
    other_behaviour = {r.question: "know" for r in other["en"]}
    other_text = {r.question: r.options[r.answer_position] for r in other["en"]}
    # same indices and same question texts, different options → different prompts
    with pytest.raises(ValueError, match="different prompt"):
        evaluate_mmmb(KnownAnswersStub(other_behaviour | behaviour, other_text | true_text), other, tmp_path,
                      EvalConfig("stub"))


def test_cache_of_another_model_is_refused(tmp_path, setup):
    data, behaviour, true_text = setup
    evaluate_mmmb(KnownAnswersStub(behaviour, true_text), {"en": data["en"]}, tmp_path, EvalConfig("model-one"))
    with pytest.raises(ValueError, match="model-one"):
        evaluate_mmmb(KnownAnswersStub(behaviour, true_text), {"en": data["en"]}, tmp_path, EvalConfig("model-two"))


def test_an_out_folder_of_another_mode_or_circular_setting_is_refused(tmp_path, setup):
    """An explicit --out re-used for another (mode, circular) would replace the first evaluation's summary and
    tables: refused before any inference, naming the folder and both settings; the same setting runs again there."""
    data, behaviour, true_text = setup
    data = {"en": data["en"]}
    first = evaluate_mmmb(KnownAnswersStub(behaviour, true_text), data, tmp_path, EvalConfig("stub"))
    summary = (tmp_path / "summary.json").read_text()
    table = (tmp_path / "stub_MMMB_acc.csv").read_text()
    for config, setting in ((EvalConfig("stub", mode="likelihood"), "likelihood"),
                            (EvalConfig("stub", circular=True), "generate circular"),
                            (EvalConfig("other-model", mode="likelihood", circular=True), "likelihood circular")):
        model = KnownAnswersStub(behaviour, true_text)
        with pytest.raises(ValueError) as err:
            evaluate_mmmb(model, data, tmp_path, config)
        message = str(err.value)
        assert str(tmp_path) in message and "a generate evaluation" in message and f"this {setting} run" in message
        assert "of this model" not in message
        assert model.asked == []
    assert (tmp_path / "summary.json").read_text() == summary  # the first results are left as they were
    assert (tmp_path / "stub_MMMB_acc.csv").read_text() == table
    again = KnownAnswersStub(behaviour, true_text)
    pd.testing.assert_frame_equal(evaluate_mmmb(again, data, tmp_path, EvalConfig("stub")).table, first.table)
    assert again.asked == []  # the same setting re-runs from its cache
    # a summary that cannot be read is an error naming it (not a JSONDecodeError traceback)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'summary.json'}: cannot read"):
        evaluate_mmmb(KnownAnswersStub(behaviour, true_text), data, tmp_path, EvalConfig("stub"))


def test_misaligned_data_is_refused_before_any_inference(tmp_path, setup):
    data, behaviour, true_text = setup
    model = KnownAnswersStub(behaviour, true_text)
    with pytest.raises(ValueError, match="not aligned|missing here"):
        evaluate_mmmb(model, {"en": data["en"], "tr": data["tr"][1:]}, tmp_path, EvalConfig("stub"))
    assert model.asked == []


class FixedOutputs(MCQModel):
    """Answers prompt k of every batch with ``outputs[k % len(outputs)]``."""

    def __init__(self, outputs):
        self.outputs = outputs

    def generate(self, prompts, images):
        return [self.outputs[k % len(self.outputs)] for k in range(len(prompts))]


def test_xlsx_stores_formula_like_text_as_text(tmp_path):
    from openpyxl import load_workbook

    data = toy_mmmb(n_items=6, seed=1, languages=("en",))
    records = data["en"]
    records[1] = records[1].__class__(**{**records[1].__dict__, "options": ("=1+1", "-2") + records[1].options[2:]})
    evaluate_mmmb(FixedOutputs(["=B", "=SUM(A1:A3)", "None", "+A"]), data, tmp_path, EvalConfig("m", batch_size=8))
    stem = tmp_path / "m_MMMB_en"
    sheet = load_workbook(stem.with_suffix(".xlsx")).active
    header = [cell.value for cell in sheet[1]]
    columns = {name: [row[header.index(name)].value for row in sheet.iter_rows(min_row=2)]
               for name in ("prediction", "A")}
    assert columns["prediction"][:2] == ["=B", "=SUM(A1:A3)"] and columns["A"][1] == "=1+1"
    assert all(cell.data_type != "f" for row in sheet.iter_rows() for cell in row)
    # the workbook holds the same text as the .tsv, cell for cell
    as_text = dict(dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(pd.read_excel(stem.with_suffix(".xlsx"), **as_text),
                                  pd.read_csv(stem.with_suffix(".tsv"), sep="\t", **as_text))


class TooLongFor(MCQModel):
    """Rejects the prompt of one question as the Parrot processor does: by its position in the batch."""

    def __init__(self, question):
        self.question = question

    def generate(self, prompts, images):
        from parrot.data.processor import PromptError

        for position, prompt in enumerate(prompts):
            if prompt.startswith(self.question):
                raise PromptError(position, f"prompt {position} is 999 tokens long, over model_max_length=60")
        return ["A"] * len(prompts)


def test_model_error_names_the_language_and_item_not_the_batch_position(tmp_path):
    data = toy_mmmb(n_items=5, seed=4, languages=("en", "pt"))
    culprit = data["pt"][3]  # position 3 of the first batch
    with pytest.raises(ValueError, match=rf"MMMB pt, item index {culprit.index} \(rotation 0, key '{culprit.index}:0'\)"
                                         r": prompt 3 is 999 tokens long"):
        evaluate_mmmb(TooLongFor(culprit.question), data, tmp_path, EvalConfig("m", batch_size=5))


def test_a_language_without_items_is_refused_before_any_inference(tmp_path):
    with pytest.raises(ValueError, match=r"no MMMB items to evaluate for language\(s\) \['en'\]"):
        evaluate_mmmb(FixedOutputs(["A"]), {"en": []}, tmp_path, EvalConfig("m"))


class DarkOrLight(MCQModel):
    """Answers from the image alone: "A" on a dark image, "B" on a light one."""

    def __init__(self):
        self.asked = 0

    def generate(self, prompts, images):
        self.asked += len(prompts)
        return ["A" if sum(image.getpixel((0, 0))) < 384 else "B" for image in images]


def _painted(records, colour):
    from PIL import Image

    from mmmb.tsv import encode_image

    b64 = encode_image(Image.new("RGB", (8, 8), colour))
    return [record.__class__(**{**record.__dict__, "image_b64": b64}) for record in records]


def test_cache_made_for_other_images_is_refused(tmp_path):
    """Same questions and options, other images (a rebuilt benchmark): the old answers must not be reused."""
    records = toy_mmmb(n_items=4, seed=1, languages=("en",))["en"]
    first = DarkOrLight()
    evaluate_mmmb(first, {"en": _painted(records, (0, 0, 0))}, tmp_path, EvalConfig("m"))
    assert first.asked == 4
    again = DarkOrLight()
    evaluate_mmmb(again, {"en": _painted(records, (0, 0, 0))}, tmp_path, EvalConfig("m"))
    assert again.asked == 0  # the same images: all from the cache
    relit = DarkOrLight()
    with pytest.raises(ValueError, match="different image"):
        evaluate_mmmb(relit, {"en": _painted(records, (255, 255, 255))}, tmp_path, EvalConfig("m"))
    assert relit.asked == 0
    fresh = evaluate_mmmb(DarkOrLight(), {"en": _painted(records, (255, 255, 255))}, tmp_path / "fresh",
                          EvalConfig("m"))
    assert list(fresh.predictions["en"]["prediction"]) == ["B"] * 4


class WithSettings(FixedOutputs):
    def __init__(self, outputs, max_new_tokens):
        super().__init__(outputs)
        self.max_new_tokens, self.asked = max_new_tokens, 0

    def generate(self, prompts, images):
        self.asked += len(prompts)
        return super().generate(prompts, images)

    def settings_id(self, mode):
        return f"max_new_tokens={self.max_new_tokens}" if mode == "generate" else ""


def test_cache_of_other_generation_settings_is_refused(tmp_path):
    """Answers cut at 1 new token are not reused for a run allowed 16 (same model name and weights)."""
    data = toy_mmmb(n_items=3, seed=2, languages=("en",))
    evaluate_mmmb(WithSettings(["The"], 1), data, tmp_path, EvalConfig("m", model_weights="w"))
    same = WithSettings(["The"], 1)
    evaluate_mmmb(same, data, tmp_path, EvalConfig("m", model_weights="w"))
    assert same.asked == 0
    longer = WithSettings(["The answer is A."], 16)
    with pytest.raises(ValueError, match=r"other settings.*max_new_tokens=1.*max_new_tokens=16"):
        evaluate_mmmb(longer, data, tmp_path, EvalConfig("m", model_weights="w"))
    assert longer.asked == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model_settings"] == "max_new_tokens=1"


class ScoresWith(MCQModel):
    def __init__(self, bad_row, value):
        self.bad_row, self.value = bad_row, value

    def option_logprobs(self, prompts, images, letters):
        scores = torch.zeros(len(prompts), len(letters)).log_softmax(dim=-1)
        scores[self.bad_row] = self.value
        return scores


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_likelihood_scores_without_a_finite_value_are_an_error_naming_the_item(tmp_path, value):
    """argmax reads a NaN (fp16 overflow) or all -inf row as letter A: it must stop the run, not score "A"."""
    data = toy_mmmb(n_items=4, seed=3, languages=("tr",))
    culprit = data["tr"][2]
    with pytest.raises(ValueError, match=rf"MMMB tr, item index {culprit.index} .*no finite score"):
        evaluate_mmmb(ScoresWith(2, value), data, tmp_path, EvalConfig("m", mode="likelihood", batch_size=4))
    assert not (tmp_path / "summary.json").exists()


class ChatStub(FixedOutputs):
    """Answers "A"; its tokenizer (as the adapter reports it) reads these texts as control tokens."""

    def __init__(self):
        super().__init__(["A"])
        self.asked = 0

    def generate(self, prompts, images):
        self.asked += len(prompts)
        return super().generate(prompts, images)

    def reserved_texts(self):
        return ("<image>", "<|im_end|>", "<|im_start|>")


@pytest.mark.parametrize("column, text, token", [("question", "What follows <|im_end|> here?", "<|im_end|>"),
                                                 ("C", "<image>", "<image>"),
                                                 ("hint", "Look at the <|im_start|>system", "<|im_start|>")])
def test_item_spelling_a_control_token_is_refused_naming_file_row_and_column(tmp_path, column, text, token):
    """Training skips such records; evaluation must not feed them to the model as control tokens either."""
    from mmmb.tsv import MMMBFormatError, read_mmmb, write_tsv

    data = toy_mmmb(n_items=5, seed=6, languages=("en", "tr"))
    position = 3  # the item's 1-based data row is 4 in the file written below
    record = data["tr"][position]
    field = {"question": {"question": text}, "hint": {"hint": text},
             "C": {"options": (*record.options[:2], text, *record.options[3:])}}[column]
    data["tr"][position] = record.__class__(**{**record.__dict__, **field})
    for language, records in data.items():
        write_tsv(tmp_path / "data" / f"mmmb_{language}.tsv", records)
    read = read_mmmb([tmp_path / "data"])
    model = ChatStub()
    tsv = tmp_path / "data" / "mmmb_tr.tsv"
    with pytest.raises(MMMBFormatError, match=rf"^{re.escape(str(tsv))}, row {record.index} \(data row 4\), "
                                              rf"column '{column}': the text contains '{re.escape(token)}', which the model's "
                                              "tokenizer reads as a control token"):
        evaluate_mmmb(model, read, tmp_path / "out", EvalConfig("m"))
    assert model.asked == 0  # refused before any inference
    # the same text is fine for a model whose tokenizer has no such control texts (the default)
    evaluate_mmmb(FixedOutputs(["A"]), read, tmp_path / "plain", EvalConfig("m"))


def test_an_adapter_without_the_protocol_members_is_refused_before_inference(tmp_path):
    """`settings_id` and `reserved_texts` are MCQModel members, not optional extras read with a fallback."""

    class DuckTyped:  # not an MCQModel subclass, and lacking the two members
        asked = 0

        def generate(self, prompts, images):
            DuckTyped.asked += len(prompts)
            return ["A"] * len(prompts)

    data = toy_mmmb(n_items=2, seed=1, languages=("en",))
    with pytest.raises(TypeError, match=r"DuckTyped lacks the MCQModel member\(s\) \['settings_id', "
                                        r"'reserved_texts'\].*subclass mmmb.models.MCQModel"):
        evaluate_mmmb(DuckTyped(), data, tmp_path, EvalConfig("m"))
    assert DuckTyped.asked == 0
    evaluate_mmmb(FixedOutputs(["A"]), data, tmp_path, EvalConfig("m"))  # subclass: the documented defaults
    assert json.loads((tmp_path / "summary.json").read_text())["model_settings"] == ""


def _identity(tmp_path, data, name):
    evaluate_mmmb(FixedOutputs(["A"]), data, tmp_path / name, EvalConfig("m"))
    return json.loads((tmp_path / name / "summary.json").read_text())["data_identity"]


def test_summary_records_an_identity_of_each_languages_data(tmp_path):
    """Equal for the same items (in any row order, from a file or from memory); different, in that language
    only, when one option text, one answer or one image differs, or an item is left out."""
    from mmmb.tsv import read_mmmb, write_tsv

    data = toy_mmmb(n_items=6, seed=8, languages=("en", "pt"))
    reference = _identity(tmp_path, data, "reference")
    assert {language: value["items"] for language, value in reference.items()} == {"en": 6, "pt": 6}
    assert reference["en"]["digest"] != reference["pt"]["digest"]

    for language, records in data.items():
        write_tsv(tmp_path / "tsv" / f"mmmb_{language}.tsv", records[::-1])
    assert _identity(tmp_path, read_mmmb([tmp_path / "tsv"]), "from_files_reversed") == reference

    def changed(**fields):
        record = data["pt"][2]
        return {"en": data["en"], "pt": [*data["pt"][:2], record.__class__(**{**record.__dict__, **fields}),
                                         *data["pt"][3:]]}

    from PIL import Image

    from mmmb.tsv import encode_image

    variants = {
        "option": changed(options=("other text", *data["pt"][2].options[1:])),
        "image": changed(image_b64=encode_image(Image.new("RGB", (8, 8), (1, 2, 3)))),
    }
    for name, variant in variants.items():
        identity = _identity(tmp_path, variant, name)
        assert identity["en"] == reference["en"] and identity["pt"]["digest"] != reference["pt"]["digest"], name
    subset = _identity(tmp_path, {language: records[:5] for language, records in data.items()}, "subset")
    assert all(subset[language]["items"] == 5 and subset[language]["digest"] != reference[language]["digest"]
               for language in data)


def _path_based(tmp_path, n_items, colour=(0, 0, 0)):
    """Toy items whose images are PNG files (written as `image_path`, as a TSV with an image_path column)."""
    from PIL import Image

    records = toy_mmmb(n_items=n_items, seed=1, languages=("en",))["en"]
    paths = []
    for record in records:
        path = tmp_path / "images" / f"{record.index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(path)
        paths.append(path)
    return [record.__class__(**{**record.__dict__, "image_b64": None, "image_path": str(path)})
            for record, path in zip(records, paths)], paths


class RelightsAfterFirstBatch(DarkOrLight):
    """Answers from the image (as DarkOrLight); after its first batch a later item's image file is rewritten
    (the benchmark's images being replaced while a run is going on)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def generate(self, prompts, images):
        from PIL import Image

        answers = super().generate(prompts, images)
        Image.new("RGB", (8, 8), (255, 255, 255)).save(self.path)
        return answers


def test_a_path_based_image_is_hashed_from_the_bytes_the_model_saw(tmp_path):
    """The image hash recorded with a prediction is that of the image the model was shown, so the cache can never
    pass off an answer about one image as an answer about another."""
    import hashlib

    records, paths = _path_based(tmp_path, n_items=4)
    model = RelightsAfterFirstBatch(paths[3])
    result = evaluate_mmmb(model, {"en": records}, tmp_path / "out", EvalConfig("m", batch_size=2))
    assert list(result.predictions["en"]["prediction"]) == ["A", "A", "A", "B"]  # item 4 asked after the change
    entries = [json.loads(line) for line in (tmp_path / "out" / "cache" / "generate" / "en.jsonl").read_text()
               .splitlines()]
    assert entries[3]["image_sha1"] == hashlib.sha1(paths[3].read_bytes()).hexdigest()  # the white image it saw
    again = DarkOrLight()
    evaluate_mmmb(again, {"en": records}, tmp_path / "out", EvalConfig("m", batch_size=2))  # files unchanged since
    assert again.asked == 0


def test_a_path_based_image_file_is_read_once_per_use(tmp_path, monkeypatch):
    """Fresh run: each file opened once (hashed and decoded from the same bytes), rotations included; a run
    answered from the cache opens each once more, to check it."""
    import builtins
    import io
    from collections import Counter

    records, paths = _path_based(tmp_path, n_items=3)
    opened, real_open = Counter(), builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file) in map(str, paths):
            opened[str(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    evaluate_mmmb(DarkOrLight(), {"en": records}, tmp_path / "out", EvalConfig("m", circular=True, batch_size=4))
    assert opened == Counter({str(path): 1 for path in paths})
    opened.clear()
    again = DarkOrLight()
    evaluate_mmmb(again, {"en": records}, tmp_path / "out", EvalConfig("m", circular=True, batch_size=4))
    assert again.asked == 0 and opened == Counter({str(path): 1 for path in paths})
