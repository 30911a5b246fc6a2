"""`ParrotProcessor`: chat prompts + images -> the tensors `ParrotForCausalLM` takes.

    processor = ParrotProcessor.from_pretrained(model_dir)
    messages = processor.build_messages("What colour is the circle?")  # one user turn, "<image>\n" prepended
    batch = processor([messages], [image], padding_side="left")        # input_ids, attention_mask, pixel_values
    new_tokens = model.generate(**batch, max_new_tokens=16)
    processor.batch_decode(new_tokens)

Prompts given as messages are tokenised segment by segment by the chat template (`ChatTemplate.encode`), exactly
as training tokenises conversations. Prompts given as already-formatted strings (`build_prompt`) are tokenised
whole, which a byte-level BPE can merge differently across a segment boundary (e.g. an earlier answer starting
with "\n"); prefer messages.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..fileio import is_finite_number, is_whole_number
from .images import IMAGE_MODES, ImageTransform, load_image
from .templates import IGNORE_INDEX, IMAGE_TOKEN, TEMPLATES, get_template

logger = logging.getLogger(__name__)

PROCESSOR_FILE = "parrot_processor.json"


class PromptError(ValueError):
    """A prompt the processor cannot encode; ``position`` is its index in the batch, so that a caller who knows
    what the prompts are (an evaluator's items) can name the culprit."""

    def __init__(self, position: int, message: str):
        self.position = position
        super().__init__(message)


def _pad_flags(flags: list[list[bool]], padding_side: str) -> torch.Tensor:
    """Ragged per-prompt flags -> (B, T) bool, padded with False on `padding_side` as the ids are padded."""
    width = max(map(len, flags), default=0)
    rows = [[False] * (width - len(f)) + f if padding_side == "left" else f + [False] * (width - len(f))
            for f in flags]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(flags), width)


def check_image_normalisation(name: str, value, where: str = "", error: type[Exception] = ValueError) -> None:
    """The one rule for `image_mean` / `image_std` (`name`), wherever they are read (processor settings, model
    config, recipe, a tower's preprocessor_config.json): a list or tuple of 3 finite real numbers (RGB; a bool is no
    number), and each std > 0, as pixels are divided by it. NaN / inf or a zero std would make every pixel value,
    hence every logit, NaN without an error. `error` (ValueError by default) names `where` (the caller's context:
    the file, `processor setting `, ...), the field and the value."""
    std = name == "image_std"
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(is_finite_number(v) for v in value)
            and (not std or all(v > 0 for v in value))):
        raise error(f"{where}{name}={value!r} must be 3 finite numbers (RGB)"
                    + (", each > 0 (pixels are divided by it)" if std else ""))


def check_template_name(value, where: str = "", name: str = "template", error: type[Exception] = ValueError) -> None:
    """A chat template setting must name one of `parrot.data.templates.TEMPLATES`; `error` (ValueError by default)
    names `where` (the caller's context: the file, `processor setting `, ...), the field `name` and the value."""
    if not isinstance(value, str) or value not in TEMPLATES:
        raise error(f"{where}{name}={value!r}; use one of {sorted(TEMPLATES)}")


@dataclass(frozen=True)
class ProcessorSettings:
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_mode: str = "pad"
    template: str = "chatml"
    num_image_tokens: int = 0  # visual tokens per image, to check prompt lengths against model_max_length
    model_max_length: int = 2048

    def __post_init__(self):
        # Checked here, so that a bad value (e.g. a NaN model_max_length, which turns every prompt-length check off)
        # is refused by name when built and when read back (`from_pretrained` adds the file), never saved or used.
        for name, minimum in (("image_size", 1), ("num_image_tokens", 0), ("model_max_length", 1)):
            value = getattr(self, name)
            if not is_whole_number(value) or value < minimum:
                raise ValueError(f"processor setting {name}={value!r} must be a whole number >= {minimum}")
        for name in ("image_mean", "image_std"):
            check_image_normalisation(name, getattr(self, name), "processor setting ")
        if not isinstance(self.image_mode, str) or self.image_mode not in IMAGE_MODES:
            raise ValueError(f"processor setting image_mode={self.image_mode!r}; use one of {list(IMAGE_MODES)}")
        check_template_name(self.template, "processor setting ")
        # JSON stores tuples as lists; keep one canonical type so settings compare equal after a round trip.
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))


# The settings that follow from the model's config (`settings_for`), compared by `mismatches`.
_MODEL_SETTINGS = ("image_size", "image_mean", "image_std", "image_mode", "num_image_tokens")


class ParrotProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, settings: ProcessorSettings):
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token first")
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_transform = ImageTransform(
            settings.image_size, tuple(settings.image_mean), tuple(settings.image_std), settings.image_mode
        )
        self.template = get_template(settings.template).with_special_tokens(tokenizer)

    # --- prompts -------------------------------------------------------------------------------------------
    def build_messages(
        self,
        question: str,
        with_image: bool = True,
        system: str | None = None,
        history: list[dict[str, str]] | None = None,
    ) -> list[dict[str, str]]:
        """Optional system message, earlier turns, then one user turn (image placeholder first, as in LLaVA)."""
        if not isinstance(question, str):  # e.g. build_prompt(build_messages(q)): the list's repr became the question
            raise TypeError(f"question must be the user's text (str), got {type(question).__name__}: "
                            f"{question!r:.80}")
        content = f"{IMAGE_TOKEN}\n{question}" if with_image else question
        head = [{"role": "system", "content": system}] if system is not None else []
        history = list(history or [])
        if system is not None and history and history[0]["role"] == "system":  # `system` overrides it
            history = history[1:]
        return head + history + [{"role": "user", "content": content}]

    def build_prompt(
        self,
        question: str,
        with_image: bool = True,
        system: str | None = None,
        history: list[dict[str, str]] | None = None,
    ) -> str:
        """`build_messages(...)` rendered as one string, ready to generate (for display; encode the messages)."""
        messages = self.build_messages(question, with_image, system, history)
        return self.template.render(messages, add_generation_prompt=True)

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """(input_ids, labelled) of a chat awaiting the assistant's answer, tokenised segment by segment as in
        training; `labelled[i]` marks ids of earlier assistant answers (training's labelled tokens)."""
        return self.template.encode(messages, self.tokenizer, add_generation_prompt=True)

    # --- tensors -------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompts: list[list[dict[str, str]]] | list[str],
        images: list[Image.Image | str | None] | None = None,
        padding_side: str = "left",
        return_labels: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenise prompts and transform their images (one image per `<image>` in order).

        A prompt is a list of messages (encoded with `encode`, as training does) or an already-formatted string
        (tokenised whole). `images[i]` belongs to prompt i (None for a text-only prompt). Raises ValueError naming
        the prompt when its placeholder count does not match or it is longer than `model_max_length` with its
        visual tokens. `return_labels` (message prompts only) adds "labels" (B, T): the ids of earlier answers,
        IGNORE_INDEX elsewhere and on padding, as training labels the same tokens.
        """
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images entries (use None for no image)")
        encoded, labelled = self._encode_prompts(prompts, return_labels)
        pixel_values = []
        for i, (ids, image) in enumerate(zip(encoded, images)):
            placeholders = ids.count(self.image_token_id)
            expected = 0 if image is None else 1
            if placeholders != expected:
                raise PromptError(
                    i, f"prompt {i} has {placeholders} {IMAGE_TOKEN!r} placeholders but {expected} image(s) were given"
                )
            length = len(ids) + placeholders * (self.settings.num_image_tokens - 1)
            if length > self.settings.model_max_length:
                raise PromptError(
                    i, f"prompt {i} is {length} tokens long (visual tokens included), over model_max_length="
                    f"{self.settings.model_max_length}"
                )
            if image is not None:
                pixel_values.append(self.image_transform(load_image(image, name=f"image of prompt {i}")))
        self.tokenizer.padding_side = padding_side
        batch = self.tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if return_labels:
            out["labels"] = torch.where(_pad_flags(labelled, padding_side), out["input_ids"], IGNORE_INDEX)  # (B, T)
        if pixel_values:
            out["pixel_values"] = torch.stack(pixel_values)  # (n_images, 3, S, S)
        return out

    def _encode_prompts(self, prompts: list, with_labelled: bool) -> tuple[list[list[int]], list[list[bool]]]:
        """Ids per prompt (messages segment-wise, strings whole) and, for message prompts, the labelled flags."""
        encoded, labelled = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if with_labelled:
                    raise ValueError(f"prompt {i} is a string; labels need prompts given as messages")
                ids, flags = self.tokenizer(prompt, add_special_tokens=False)["input_ids"], []
            else:
                ids, flags = self.encode(prompt)
            encoded.append(ids)
            labelled.append(flags)
        return encoded, labelled

    def batch_decode(self, token_ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)

    def end_of_answer_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        """Token ids that end a generated answer: the model's eos id(s) (`generation_config.eos_token_id`), then the
        chat template's end of an answer as training labels it (ChatML's `<|im_end|>`, the Llama template's eos) when
        the tokenizer has it as one token. Pass them to `generate(eos_token_id=...)`.

        A ChatML model whose eos is another token (an LLM whose tokenizer ends text with `<|endoftext|>`, e.g. a base
        Qwen) was still trained to close each answer with `<|im_end|>`; stopping only at its eos, generation goes on
        past the answer into a next turn it invents ("user\n...", the control tokens skipped when decoded)."""
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        sentinel = "\x00answer\x00"
        closing = [s.text.split(sentinel, 1)[1].strip() for s in self.template.segments(
            [{"role": "user", "content": "question"}, {"role": "assistant", "content": sentinel}]) if sentinel in s.text]
        for text in closing:
            end = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if len(end) == 1 and end[0] not in ids:
                ids.append(end[0])
            elif len(end) > 1:
                logger.warning("the chat template ends an answer with %r, which this tokenizer splits into %d tokens: "
                               "answers end only at the model's eos %s", text, len(end), ids)
        return ids

    # --- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / PROCESSOR_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ParrotProcessor":
        directory = Path(directory)
        settings_path = directory / PROCESSOR_FILE
        if not settings_path.is_file():
            raise FileNotFoundError(f"{settings_path} not found: not a Parrot model/processor directory")
        try:
            raw = json.loads(settings_path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object of settings, got {type(raw).__name__}")
            settings = ProcessorSettings(**raw)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{settings_path}: invalid processor settings ({err})") from err
        return cls(AutoTokenizer.from_pretrained(directory), settings)

    def mismatches(self, config) -> list[str]:
        """Where this processor disagrees with a `ParrotConfig` ("field: processor vs model"): a processor saved
        for another model would count, size or normalise images differently from what the model was built for."""
        ours, model = self.settings, self.settings_for(config, self.settings.template, self.settings.model_max_length)
        pairs = {name: (getattr(ours, name), getattr(model, name)) for name in _MODEL_SETTINGS}
        pairs["image_token_id"] = (self.image_token_id, config.image_token_id)
        return [f"{name}: {mine!r} vs {theirs!r}" for name, (mine, theirs) in pairs.items() if mine != theirs]

    @staticmethod
    def settings_for(config, template: str = "chatml", model_max_length: int = 2048) -> ProcessorSettings:
        """The settings a `ParrotConfig` implies (image size, normalisation, aspect mode, visual token count)."""
        return ProcessorSettings(
            image_size=config.image_size,
            image_mean=tuple(config.image_mean),
            image_std=tuple(config.image_std),
            image_mode=config.image_aspect_mode,
            template=template,
            num_image_tokens=config.num_image_tokens,
            model_max_length=model_max_length,
        )

    @classmethod
    def for_model(cls, tokenizer: PreTrainedTokenizerBase, config, template: str = "chatml",
                  model_max_length: int = 2048) -> "ParrotProcessor":
        """A processor matching a `ParrotConfig` (see `settings_for`)."""
        return cls(tokenizer, cls.settings_for(config, template, model_max_length))
