"""A VLMEvalKit model for checkpoints of this package (`run.py --model <name>` evaluation).

VLMEvalKit (open-compass/VLMEvalKit, `vlmeval/inference.py`) drives a local model like this:

    model = supported_VLM[name]()                       # a class or functools.partial with its arguments
    model.set_dump_image(dataset.dump_image)            # writes a TSV row's base64 image(s) to files
    struct = model.build_prompt(line, dataset=name) if model.use_custom_prompt(name) else dataset.build_prompt(line)
    answer = model.generate(message=struct, dataset=name)  # struct: [{"type": "image"|"text", "value": ...}, ...]

`ParrotVLMEval` implements that interface by duck typing (VLMEvalKit itself is not needed to import it).
Prompts follow the official Parrot adapter (AIDC-AI/Parrot, `VLMEvalKit/vlmeval/vlm/parrot.py`): the texts and
`<image>` placeholders are concatenated in message order, one image + one text becomes "<image>\\n{text}", and
the result is one ChatML user turn; decoding is greedy. For multiple-choice datasets `build_prompt` writes
"[hint\\n]question\\nA. ...\\nB. ...\\n{instruction}" with the instruction in the dataset's language, taken from
its name suffix (`MMMB_ar`, `MMBench_dev_tr`, `MMBench_DEV_CN`, ...; see `mmmb.languages`).

Text that the tokenizer would read as a control token (`<|im_end|>`, end of text, `<image>`: the
`control_token_strings` that training skips records for) is refused with a ValueError, as `mmmb.evaluate` refuses
it: by `build_prompt` naming the dataset, the row's index and the column, and by `generate` naming the message item.

Register it in VLMEvalKit's `vlmeval/config.py`:

    from functools import partial
    from parrot.integrations.vlmevalkit import ParrotVLMEval
    supported_VLM["parrot-7b-ours"] = partial(ParrotVLMEval, model_path="/models/parrot-7b-converted")

then `python run.py --data MMMB_en MMMB_cn --model parrot-7b-ours`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..data.processor import IMAGE_TOKEN
from ..data.templates import reserved_prompt_texts

# Dataset families VLMEvalKit evaluates as single-image multiple choice (used when VLMEvalKit's own
# `DATASET_TYPE` cannot be imported).
MCQ_DATASET_PREFIXES = ("MMMB", "MMBench", "SEEDBench", "CCBench", "AI2D", "ScienceQA", "MMStar", "RealWorldQA")
# For rows without options, as the official Parrot adapter (Chinese wherever the prompt holds a Chinese character).
OPEN_ANSWER_INSTRUCTION = {"en": "Answer the question using a single word or phrase.", "zh": "请用单个词或短语回答问题。"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def dataset_is_mcq(dataset: str | None) -> bool:
    """Whether VLMEvalKit treats `dataset` as multiple choice (its `DATASET_TYPE` when installed)."""
    if dataset is None:
        return False
    try:
        from vlmeval.dataset import DATASET_TYPE
    except ImportError:
        return dataset.startswith(MCQ_DATASET_PREFIXES)
    return DATASET_TYPE(dataset) in ("MCQ", "multi-choice")


def dataset_language(dataset: str | None) -> str:
    """The language code of a dataset from its name suffix ("MMMB_cn" -> "zh"); "en" when it has none."""
    from mmmb.languages import canonical_language

    suffix = (dataset or "").rsplit("_", 1)[-1]
    try:
        return canonical_language(suffix)
    except ValueError:
        return "en"


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))  # pandas NaN = empty cell


def normalise_message(message) -> list[dict]:
    """VLMEvalKit's accepted inputs (str, dict, list of str, list of dicts) -> list of {"type", "value"} dicts.

    A plain string in a list is an image when it names an existing image file (as VLMEvalKit's `parse_file`).
    """
    if isinstance(message, (str, dict)):
        message = [message]
    if not isinstance(message, list) or not message:
        raise ValueError(f"message must be a non-empty list of {{'type', 'value'}} dicts or strings, got {message!r}")
    items = []
    for i, item in enumerate(message):
        if isinstance(item, str):
            is_image = Path(item).suffix.lower() in _IMAGE_SUFFIXES and Path(item).is_file()
            item = {"type": "image" if is_image else "text", "value": item}
        if not isinstance(item, Mapping) or set(item) < {"type", "value"}:
            raise ValueError(f"message item {i} is not a {{'type', 'value'}} dict: {item!r}")
        if item["type"] not in ("text", "image"):
            raise ValueError(f"message item {i} has type {item['type']!r}; Parrot takes 'text' and 'image'")
        items.append({"type": item["type"], "value": item["value"]})
    return items


class ParrotVLMEval:
    """VLMEvalKit model over a saved Parrot directory (model + processor, optionally with a MoLE adapter)."""

    INSTALL_REQ = False
    INTERLEAVE = False
    is_api = False

    def __init__(self, model_path: str, device: str | None = None, dtype: torch.dtype | None = None,
                 max_new_tokens: int = 512, **generation_kwargs):
        from ..train.export import load_trained  # plain Parrot dirs, and MoLE adapters next to the model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        model, self.processor = load_trained(model_path)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        # the model's eos and the chat template's end of an answer (<|im_end|> where the eos is another token)
        end_ids = self.processor.end_of_answer_ids(tokenizer.eos_token_id if eos is None else eos)
        self.generation_kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                      eos_token_id=end_ids or None, pad_token_id=tokenizer.pad_token_id)
        self.generation_kwargs.update(generation_kwargs)
        self.dump_image_func: Callable | None = None
        # Texts that would be tokenised as control tokens; the adapter places the image placeholder itself.
        self.reserved_texts = reserved_prompt_texts(tokenizer)

    # --- VLMEvalKit prompt hooks ----------------------------------------------------------------------------
    def set_dump_image(self, dump_image_func: Callable) -> None:
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset: str | None = None) -> list[str]:
        if self.dump_image_func is None:
            raise RuntimeError("set_dump_image(dataset.dump_image) must be called first (VLMEvalKit does it)")
        paths = self.dump_image_func(line)
        return [paths] if isinstance(paths, str) else list(paths)

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return dataset_is_mcq(dataset)

    def build_prompt(self, line, dataset: str | None = None) -> list[dict]:
        """A multiple-choice TSV row -> message: its image(s), then hint, question, options and instruction."""
        from mmmb.languages import contains_chinese
        from mmmb.prompts import mcq_prompt_text

        question = str(line["question"])
        hint = str(line["hint"]) if "hint" in line and _present(line["hint"]) else None
        options = [(letter, str(line[letter])) for letter in string.ascii_uppercase
                   if letter in line and _present(line[letter])]
        self._refuse_reserved_cells(line, dataset, [("hint", hint), ("question", question), *options])
        if options:
            text = mcq_prompt_text(question, options, dataset_language(dataset), hint)
        else:
            body = "\n".join([*([hint] if hint else []), question])
            text = body + "\n" + OPEN_ANSWER_INSTRUCTION["zh" if contains_chinese(body) else "en"]
        images = [{"type": "image", "value": path} for path in self.dump_image(line, dataset)]
        return images + [{"type": "text", "value": text}]

    def _refuse_reserved_cells(self, line, dataset: str | None, cells: list[tuple[str, str | None]]) -> None:
        """A ValueError naming the dataset, the row's index and the column of the first cell that spells a
        control-token text."""
        from mmmb.prompts import reserved_text_in, reserved_text_message

        for column, text in cells:
            found = reserved_text_in(text, self.reserved_texts) if text is not None else None
            if found is not None:
                index = line["index"] if "index" in line else "?"
                raise ValueError(f"dataset {dataset!r} (VLMEvalKit's {dataset}.tsv), index {index}, column "
                                 f"{column!r}: {reserved_text_message(found)}")

    # --- generation -------------------------------------------------------------------------------------------
    def prompt_and_images(self, message) -> tuple[str, list[str]]:
        """The chat-formatted prompt and the image paths for a message (official Parrot placement of `<image>`);
        the prompt as text, for display: `generate` encodes `chat_and_images`' messages segment-wise instead."""
        messages, images = self.chat_and_images(message)
        return self.processor.template.render(messages, add_generation_prompt=True), images

    def chat_and_images(self, message) -> tuple[list[dict[str, str]], list[str]]:
        """The chat messages (one user turn) and the image paths for a message (official placement of `<image>`)."""
        from mmmb.prompts import reserved_text_in, reserved_text_message

        items = normalise_message(message)
        for i, item in enumerate(items):
            found = reserved_text_in(str(item["value"]), self.reserved_texts) if item["type"] == "text" else None
            if found is not None:  # the adapter adds the placeholders of image items itself, below
                raise ValueError(f"message item {i}: {reserved_text_message(found)}")
        images = [item["value"] for item in items if item["type"] == "image"]
        texts = [str(item["value"]) for item in items if item["type"] == "text"]
        if len(images) > 1:
            raise ValueError(f"the message has {len(images)} images; Parrot models take one image per prompt")
        if len(images) == 1 and len(texts) == 1:
            content = f"{IMAGE_TOKEN}\n{texts[0]}"
        else:
            content = "".join(IMAGE_TOKEN if item["type"] == "image" else str(item["value"]) for item in items)
        return self.processor.build_messages(content, with_image=False), images

    @torch.inference_mode()
    def generate(self, message, dataset: str | None = None) -> str:
        """Greedy answer to one VLMEvalKit message (`dataset` is accepted as VLMEvalKit passes it)."""
        messages, images = self.chat_and_images(message)  # encoded segment-wise, as training encodes chats
        batch = self.processor([messages], [images[0] if images else None], padding_side="left")
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        new_tokens = self.model.generate(**batch, **self.generation_kwargs)  # (1, n_new)
        return self.processor.batch_decode(new_tokens)[0].strip()
