"""A session-free chat engine over a Parrot model: prompt building, streamed generation, MoE routing weights.

All per-user state lives in the immutable `Conversation` the caller holds (one per Gradio session); the engine
only owns the read-only model and processor, so sessions cannot leak into each other.

    engine = ChatEngine(*load_model(None))
    prepared = engine.prepare(image, Conversation(), "What colour is the circle?")
    for text_so_far in engine.stream_reply(prepared, GenerationSettings(max_new_tokens=32)):
        ...
    engine.routing_weights(prepared)  # (E,) Parrot MoE weights for this image + prompt, sums to 1

User text is never read as chat scaffolding: a message containing the image placeholder or any of the
tokenizer's special-token strings (e.g. `<|im_end|>`) is refused with a ChatInputError.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..data.images import BadImageError
from ..data.processor import ParrotProcessor
from ..data.templates import IMAGE_TOKEN, reserved_prompt_texts
from ..model.builder import build_tiny
from ..train.export import load_trained
from ..model.modeling import ParrotForCausalLM
from ..moe.routers import topk_weights

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where `python -m parrot.quickstart` leaves its final (stage-2) model; the demo's default when it exists.
DEFAULT_MODEL_DIR = REPO_ROOT / "runs" / "quickstart" / "stage2"
MAX_MESSAGE_CHARS = 8000  # longer messages are refused before tokenising


class ChatInputError(ValueError):
    """A request the engine refuses; the message is meant for the user."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy decoding
    top_p: float = 1.0

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= 4096:
            raise ChatInputError(f"max new tokens must be in [1, 4096], got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ChatInputError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ChatInputError(f"top-p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0.0:
            return {"do_sample": False}
        # top_k=0: no top-k cut. Left unset, HF generation samples from the 50 likeliest tokens only (its global
        # default), a truncation the UI neither shows nor controls: top-p 1.0 must mean the whole distribution.
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


@dataclass(frozen=True)
class Conversation:
    """One session's dialogue about one image (`image_key` identifies it; None = a text-only chat)."""

    image_key: str | None = None
    turns: tuple[Turn, ...] = ()

    def with_turn(self, user: str, assistant: str) -> "Conversation":
        return replace(self, turns=self.turns + (Turn(user, assistant),))


@dataclass(frozen=True)
class PreparedPrompt:
    batch: dict[str, torch.Tensor]  # processor output: input_ids (1, T), attention_mask (1, T), pixel_values
    prompt_tokens: int  # T plus the image's visual tokens
    dropped_turns: int  # oldest turns left out to fit the context (with room for the answer)
    # (1, T) the prompt's labels as training would have them: earlier assistant answers keep their ids, the rest
    # is IGNORE_INDEX. The Parrot MoE leaves labelled tokens out of its text guidance, in training and here alike.
    labels: torch.Tensor | None = None


class _StopWhenSet(StoppingCriteria):
    """Ends generate() at its next token once `event` is set (the reader of the stream has gone away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    def __init__(self, model: ParrotForCausalLM, processor: ParrotProcessor, source: str = "",
                 stream_timeout_s: float = 300.0):
        self.model = model.eval()
        self.processor = processor
        self.source = source  # where the weights came from, shown in the UI
        self.stream_timeout_s = stream_timeout_s
        # Fast tokenizers may raise "Already borrowed" when two threads encode at once; encoding is cheap.
        self._encode_lock = threading.Lock()
        self._reserved = reserved_prompt_texts(processor.tokenizer)
        self._end_ids = processor.end_of_answer_ids(self.model.generation_config.eos_token_id)

    @property
    def context_length(self) -> int:
        return self.processor.settings.model_max_length

    @property
    def num_experts(self) -> int | None:
        return self.model.config.moe_num_experts if self.model.config.use_moe else None

    # --- prompts ------------------------------------------------------------------------------------------
    def _refuse_reserved(self, conversation: Conversation, message: str) -> None:
        """Typed text must stay text: a `<|im_end|>` in it would close the user turn and let it forge a system turn,
        an `<image>` would add a placeholder without an image. Refusing is explicit where escaping would not be."""
        self._refuse_in(message, "Your message", "please remove it")
        for turn in conversation.turns:  # answers come from the model, which can spell out a reserved string
            for text in (turn.user, turn.assistant):
                self._refuse_in(text, "An earlier turn of this chat", "press Clear to start a new chat")

    def _refuse_in(self, text: str, whose: str, advice: str) -> None:
        found = next((token for token in self._reserved if token in text), None)
        if found is not None:
            raise ChatInputError(f"{whose} contains {found!r}, which this model reserves for its chat format "
                                 f"(the image placeholder and control tokens cannot be typed); {advice}.")

    @staticmethod
    def _messages(turns: tuple[Turn, ...], message: str, with_image: bool) -> list[dict[str, str]]:
        """The chat as messages, the image placeholder in the first user turn (LLaVA keeps it there all chat)."""
        messages = []
        for turn in turns + (Turn(message, ""),):
            user = f"{IMAGE_TOKEN}\n{turn.user}" if with_image and not messages else turn.user
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": turn.assistant}]
        return messages[:-1]  # the new message awaits its answer

    def prepare(self, image: Image.Image | None, conversation: Conversation, message: str,
                max_new_tokens: int = 1) -> PreparedPrompt:
        """Tokenise the chat so far plus `message`; drop the oldest turns while the prompt (visual tokens included)
        and `max_new_tokens` for the answer would overflow the context. The new message is always kept: when it
        leaves less room than `max_new_tokens` even without history, the answer gets what is left
        (`stream_reply`).

        Raises ChatInputError for an empty message, one with reserved text, or one that leaves no room for a single
        answer token even without history; BadImageError when the image cannot be prepared.
        """
        message = message.strip()
        if not message:
            raise ChatInputError("Please type a message.")
        if len(message) > MAX_MESSAGE_CHARS:
            raise ChatInputError(
                f"Your message is {len(message)} characters long; the limit is {MAX_MESSAGE_CHARS} characters."
            )
        self._refuse_reserved(conversation, message)
        reserve = max(int(max_new_tokens), 1)  # positions the answer needs after the prompt
        with_image = image is not None
        visual_extra = self.processor.settings.num_image_tokens - 1 if with_image else 0
        turns = conversation.turns
        with self._encode_lock:
            while True:
                # Segment-wise, as training tokenises: the model (and its MoE router) sees the ids training saw.
                messages = self._messages(turns, message, with_image)
                length = len(self.processor.encode(messages)[0]) + visual_extra
                if length + reserve <= self.context_length or not turns:
                    break
                turns = turns[1:]
            if length >= self.context_length:  # at least one position must stay free for the answer
                visual = f" including {self.processor.settings.num_image_tokens} image tokens" if with_image else ""
                raise ChatInputError(
                    f"Your message is too long: the prompt is {length} tokens{visual}, but this model's context "
                    f"is {self.context_length} tokens. Please shorten it."
                )
            batch = self._tensors(messages, image)
        batch = {name: tensor.to(self.model.device) for name, tensor in batch.items()}  # (pixels: the tower casts)
        labels = batch.pop("labels")  # earlier answers' ids: training leaves them out of the router's guidance
        return PreparedPrompt(batch, length, len(conversation.turns) - len(turns), labels)

    def _tensors(self, messages: list[dict[str, str]], image: Image.Image | None) -> dict[str, torch.Tensor]:
        """The processor's batch with labels; its refusals become messages for the user instead of server errors."""
        try:
            return self.processor([messages], [image], padding_side="left", return_labels=True)
        except BadImageError:
            raise
        except MemoryError as err:  # e.g. padding an extreme aspect ratio to a square canvas
            raise BadImageError("the image is too large to prepare (out of memory); please upload a smaller one") \
                from err
        except ValueError as err:  # placeholder count or length: what the checks above should already have caught
            raise ChatInputError(f"This chat cannot be encoded for the model: {err}") from err

    # --- generation ---------------------------------------------------------------------------------------
    def stream_reply(self, prepared: PreparedPrompt, settings: GenerationSettings) -> Iterator[str]:
        """Yield the answer so far after each decoded piece (generation runs in a worker thread).

        Closing the iterator early (the user left, Gradio cancelled the event) stops the worker at its next token
        instead of letting it spend the whole token budget for nobody.
        """
        max_new_tokens = min(settings.max_new_tokens, self.context_length - prepared.prompt_tokens)
        streamer = TextIteratorStreamer(
            self.processor.tokenizer, skip_prompt=True, timeout=self.stream_timeout_s, skip_special_tokens=True
        )
        stop = threading.Event()
        failures: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(
                    **prepared.batch, prompt_labels=prepared.labels, max_new_tokens=max_new_tokens,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                    **({"eos_token_id": list(self._end_ids)} if self._end_ids else {}), **settings.generate_kwargs(),
                )
            except BaseException as err:  # re-raised in the caller's thread below
                failures.append(err)
                streamer.end()

        worker = threading.Thread(target=run, name="parrot-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text
        finally:  # also on close() / garbage collection of an unfinished stream; no join: a token may take long
            stop.set()
        worker.join()
        if failures:
            raise failures[0]

    @torch.inference_mode()
    def routing_weights(self, prepared: PreparedPrompt) -> list[float] | None:
        """The weights (E,) the Parrot MoE combines its experts with for this image + prompt; None without MoE or
        image. Dense routing (the default): the router's distribution. With `moe_top_k=k`: the k selected experts'
        renormalised weights and 0 for the others (the full distribution would show experts the answer never used).

        Earlier assistant answers are left out of the router's text guidance, as in training (`prepared.labels`).
        """
        if not self.model.config.use_moe or "pixel_values" not in prepared.batch:
            return None
        batch = prepared.batch
        inputs = self.model.prepare_multimodal_inputs(batch["input_ids"], batch["attention_mask"],
                                                      batch["pixel_values"], prepared.labels)
        probs = inputs.router_probs[:1].double()  # (1, E)
        router = self.model.moe.router
        if router.top_k is not None:  # the router's own selection and renormalisation (`TopKRouter.route`)
            probs, _ = topk_weights(probs, router.top_k, router.renormalize)
        return probs[0].tolist()  # (E,)


def load_model(model_dir: str | Path | None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[ParrotForCausalLM, ParrotProcessor, str]:
    """(model, processor, description): `model_dir`, else the quickstart output, else a fresh tiny model, in eval
    mode on `device` (in `dtype`; None keeps the saved one). `ChatEngine` sends its inputs to the model's device.

    The fresh tiny model is built with the Parrot MoE on (random weights) so the router panel has something
    to show; its answers are noise until trained (`python -m parrot.quickstart`).
    """
    if model_dir is not None:
        model, processor = load_trained(model_dir)
        source = f"model from {model_dir}"
    elif (DEFAULT_MODEL_DIR / "config.json").is_file():
        logger.info("loading the quickstart model from %s", DEFAULT_MODEL_DIR)
        model, processor = load_trained(DEFAULT_MODEL_DIR)
        source = f"quickstart model ({DEFAULT_MODEL_DIR})"
    else:
        logger.info("no trained model at %s; building an untrained tiny model", DEFAULT_MODEL_DIR)
        model, processor = build_tiny(use_moe=True)
        source = "untrained tiny model (random weights: answers are noise; run `python -m parrot.quickstart` first)"
    return model.to(device=device, dtype=dtype).eval(), processor, source
