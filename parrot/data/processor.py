"""`ParrotProcessor`: chat prompts + images -> the tensors `ParrotForCausalLM` takes.

    processor = ParrotProcessor.from_pretrained(model_dir)
    prompt = processor.build_prompt("What colour is the circle?")      # chat-formatted, "<image>\n" prepended
    batch = processor([prompt], [image], padding_side="left")          # input_ids, attention_mask, pixel_values
    new_tokens = model.generate(**batch, max_new_tokens=16)
    processor.batch_decode(new_tokens)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .images import ImageTransform, load_image
from .templates import get_template

PROCESSOR_FILE = "parrot_processor.json"
IMAGE_TOKEN = "<image>"


class PromptError(ValueError):
    """A prompt the processor cannot encode; ``position`` is its index in the batch, so that a caller who knows
    what the prompts are (an evaluator's items) can name the culprit."""

    def __init__(self, position: int, message: str):
        self.position = position
        super().__init__(message)


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
    def build_prompt(
        self,
        question: str,
        with_image: bool = True,
        system: str | None = None,
        history: list[dict[str, str]] | None = None,
    ) -> str:
        """One user turn (image placeholder first, as in LLaVA) after optional earlier turns, ready to generate."""
        content = f"{IMAGE_TOKEN}\n{question}" if with_image else question
        messages = list(history or []) + [{"role": "user", "content": content}]
        return self.template.render(messages, add_generation_prompt=True, system=system)

    # --- tensors -------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompts: list[str],
        images: list[Image.Image | str | None] | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """Tokenise already-formatted prompts and transform their images (one image per `<image>` in order).

        `images[i]` belongs to prompt i (None for a text-only prompt). Raises ValueError naming the prompt when
        its placeholder count does not match or it is longer than `model_max_length` with its visual tokens.
        """
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images entries (use None for no image)")
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
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
        if pixel_values:
            out["pixel_values"] = torch.stack(pixel_values)  # (n_images, 3, S, S)
        return out

    def batch_decode(self, token_ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)

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
            raw = json.loads(settings_path.read_text())
            settings = ProcessorSettings(**raw)
        except (json.JSONDecodeError, TypeError) as err:
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
