"""The Gradio Blocks UI: image + multi-turn chat (streamed), sampling controls, examples, MoE router panel.

Per-user state is a `ChatSession` in a `gr.State` (Gradio keeps one per browser session / API client); the
handlers are pure functions of their inputs and that state. Bad input never raises: it becomes a "⚠️" message
in the chat (or the router panel), so the server keeps serving.

API endpoints (for `gradio_client`; the session's state is kept server-side per client):
    /chat(image, message, temperature, top_p, max_new_tokens) -> (chatbot, textbox, router_plot, router_note)
    /route(image, message, max_new_tokens=64) -> (router_plot, router_note)
    /clear() -> (image, textbox, chatbot, router_plot, router_note)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace

import gradio as gr
import pandas as pd

from ..data.images import BadImageError
from .engine import ChatEngine, ChatInputError, Conversation, GenerationSettings, PreparedPrompt
from .examples import Example
from .uploads import open_upload, upload_path

logger = logging.getLogger(__name__)

WARNING = "⚠️ "
EMPTY_ANSWER = "(the model returned an empty answer)"
ROUTER_COLUMNS = ("expert", "weight")
# Each paragraph of the chat, the message box and the examples takes its direction from its own text (what HTML's
# dir="auto" does): in the left-to-right page an Arabic line would otherwise put its closing "!" or "." at its
# start. Passed to `launch(css=...)` (Gradio 6 takes page CSS there).
PAGE_CSS = """
#parrot-chatbot .message-content :is(p, li, h1, h2, h3, h4, h5, h6, blockquote, td, th),
#parrot-message textarea, #parrot-examples td { unicode-bidi: plaintext; text-align: start; }
"""


@dataclass(frozen=True)
class ChatSession:
    conversation: Conversation = field(default_factory=Conversation)
    messages: tuple[dict, ...] = ()  # what the chatbot shows: the conversation plus warnings

    def show(self, *messages: dict) -> "ChatSession":
        return replace(self, messages=self.messages + messages)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def router_frame(weights: list[float] | None) -> pd.DataFrame:
    """Routing weights -> the bar chart's data: one row per expert."""
    if weights is None:
        return pd.DataFrame({"expert": pd.Series(dtype=str), "weight": pd.Series(dtype=float)})
    return pd.DataFrame({"expert": [f"expert {i}" for i in range(len(weights))], "weight": weights})


def router_note(engine: ChatEngine, weights: list[float] | None, has_image: bool) -> str:
    if engine.num_experts is None:
        return "This model has no Parrot MoE (`use_moe: false`), so there is no routing to show."
    if not has_image:
        return "Upload an image: the Parrot MoE routes each image's visual tokens by the prompt."
    if weights is None:
        return ""
    top = max(range(len(weights)), key=weights.__getitem__)
    return f"Routed mostly to **expert {top}** (weight {weights[top]:.3f}) of {len(weights)} experts."


def _number(field: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ChatInputError(f"{field} must be a number, got {value!r}") from None


def _whole_number(field: str, value) -> int:
    number = _number(field, value)
    if not number.is_integer():  # also NaN and infinity
        raise ChatInputError(f"{field} must be a whole number, got {value!r}")
    return int(number)


def generation_settings(temperature, top_p, max_new_tokens) -> GenerationSettings:
    """The sampling controls as settings. API callers (preprocess=False) can send anything in place of a slider's
    number, so a bad value is refused by name like any other bad input."""
    return GenerationSettings(_whole_number("max new tokens", max_new_tokens), _number("temperature", temperature),
                              _number("top-p", top_p))


class DemoHandlers:
    """The event handlers, bound to one engine (read-only); every per-user value comes in as an argument."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine

    def _prepare(self, image_payload, session: ChatSession, message: str,
                 max_new_tokens: int) -> tuple[ChatSession, PreparedPrompt]:
        image = open_upload(image_payload)
        located = upload_path(image_payload)
        image_key = str(located[0]) if located else None
        if image_key != session.conversation.image_key:  # another image: a new conversation about it
            session = ChatSession(Conversation(image_key))
        return session, self.engine.prepare(image, session.conversation, message, max_new_tokens)

    def _route(self, prepared: PreparedPrompt) -> tuple[pd.DataFrame, str]:
        weights = self.engine.routing_weights(prepared)
        return router_frame(weights), router_note(self.engine, weights, "pixel_values" in prepared.batch)

    def chat(self, image_payload, message, temperature, top_p, max_new_tokens,
             session: ChatSession | None) -> Iterator[tuple]:
        """Yields (chatbot messages, textbox, session, router plot, router note) as the answer streams in.

        The textbox is cleared once, with the first chunk; later yields leave it unchanged (`gr.skip()`, which an
        API caller receives as {"__type__": "update"}), so a question typed while the answer streams is kept.
        A refused or failed turn gives the message back to fix it.
        """
        session = session or ChatSession()
        message = message or ""
        try:
            settings = generation_settings(temperature, top_p, max_new_tokens)
            session, prepared = self._prepare(image_payload, session, message, settings.max_new_tokens)
            plot, note = self._route(prepared)
        except (ChatInputError, BadImageError) as err:
            shown = session.show(*([_user(message)] if message.strip() else []), _assistant(f"{WARNING}{err}"))
            yield list(shown.messages), message, shown, gr.skip(), gr.skip()
            return
        if prepared.dropped_turns:
            note += (f"\n\n(The {prepared.dropped_turns} oldest turn(s) were left out to fit the context with room "
                     f"for {settings.max_new_tokens} new tokens.)")
        message = message.strip()
        asked = session.show(_user(message))
        answer = ""
        textbox = ""  # cleared with the first chunk, then left alone: the user may type the next question meanwhile
        try:
            # closing(): when Gradio drops this handler mid-answer, the stream is closed and generation stops.
            with closing(self.engine.stream_reply(prepared, settings)) as stream:
                for answer in stream:
                    yield list(asked.messages) + [_assistant(answer)], textbox, asked, plot, note
                    textbox = gr.skip()
        except Exception as err:  # a failed generation must not take the server down
            logger.exception("generation failed")
            failed = asked.show(_assistant(f"{WARNING}generation failed: {err}"))
            yield list(failed.messages), message, failed, plot, note
            return
        done = ChatSession(session.conversation.with_turn(message, answer),
                           asked.messages + (_assistant(answer or EMPTY_ANSWER),))
        yield list(done.messages), textbox, done, plot, note  # "" only if nothing was streamed

    def route(self, image_payload, message, session: ChatSession | None,
              max_new_tokens=GenerationSettings.max_new_tokens) -> tuple[pd.DataFrame, str]:
        """The router panel alone, for the current image + message (+ this session's earlier turns): the prompt
        /chat would send with this `max_new_tokens` (which decides how many old turns fit the context)."""
        session = session or ChatSession()
        try:
            budget = GenerationSettings(_whole_number("max new tokens", max_new_tokens)).max_new_tokens  # checked
            _, prepared = self._prepare(image_payload, session, message or "", budget)
        except (ChatInputError, BadImageError) as err:
            return router_frame(None), f"{WARNING}{err}"
        return self._route(prepared)

    def clear(self) -> tuple:
        return None, "", [], None, router_frame(None), ""

    def reset_chat(self) -> tuple:
        return [], None, router_frame(None), ""


def build_app(engine: ChatEngine, examples: list[Example], concurrency_limit: int = 2,
              max_queue_size: int = 64) -> gr.Blocks:
    """The Blocks app with its queue configured (`concurrency_limit` generations run at once, others wait)."""
    handlers = DemoHandlers(engine)
    moe_line = (f"Parrot MoE: {engine.num_experts} experts" if engine.num_experts else "no Parrot MoE")
    with gr.Blocks(title="Parrot: multilingual multimodal chat", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Parrot: multilingual multimodal chat\n"
            f"Upload an image and ask about it in any language. Model: {engine.source}; {moe_line}; "
            f"context {engine.context_length} tokens."
        )
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=280,
                                 elem_id="parrot-image")
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="parrot-temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="parrot-top-p")
                    most = max(1, min(512, engine.context_length - 1))  # more never fits the context
                    max_new_tokens = gr.Slider(1, most, value=min(GenerationSettings.max_new_tokens, most), step=1,
                                               label="Max new tokens", elem_id="parrot-max-new-tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="parrot-chatbot", buttons=["copy", "copy_all"],
                                     placeholder="Ask a question about the image: en, zh, pt, ar, tr, ru, ...")
                textbox = gr.Textbox(label="Message", show_label=False, lines=1, max_lines=6,
                                     placeholder="Type a message and press Enter", elem_id="parrot-message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="parrot-send")
                    show_routing = gr.Button("Show expert routing", elem_id="parrot-route")
                    clear = gr.Button("Clear", elem_id="parrot-clear")
            with gr.Column(scale=2):
                router_plot = gr.BarPlot(router_frame(None), x="expert", y="weight", y_lim=[0.0, 1.0],
                                         title="Parrot MoE routing", label="Router", elem_id="parrot-router",
                                         sort=None)
                note = gr.Markdown(router_note(engine, None, has_image=False), elem_id="parrot-router-note")
        gr.Examples(
            examples=[[str(example.image_path), example.prompt] for example in examples],
            inputs=[image, textbox],
            label="Examples (en, zh, pt, ar, tr, ru)",
            elem_id="parrot-examples",
        )

        answering = gr.on(
            triggers=[textbox.submit, send.click],
            fn=handlers.chat,
            inputs=[image, textbox, temperature, top_p, max_new_tokens, session],
            outputs=[chatbot, textbox, session, router_plot, note],
            api_name="chat",
            preprocess=False,  # the raw upload: bad files become chat messages, not server errors
        )
        show_routing.click(handlers.route, inputs=[image, textbox, session, max_new_tokens],
                           outputs=[router_plot, note], api_name="route", preprocess=False)
        # Clear, a new image and the chatbot's own trash button start a new conversation. Each first cancels an answer
        # still streaming (which stops its generation, see `ChatEngine.stream_reply`): its later chunks would write the
        # old chat and session back over the reset, and the next message would carry the cleared conversation. The
        # cancel is registered before the reset because the browser runs a trigger's listeners in that order, each
        # to its end: cancelling after the reset leaves a window for those chunks. The resets are queued (not
        # queue=False), so their result reaches the browser on the session's event stream after any chunk sent before.
        for trigger in (clear.click, image.change, chatbot.clear):
            trigger(None, cancels=[answering], api_visibility="private")
        clear.click(handlers.clear, inputs=None, outputs=[image, textbox, chatbot, session, router_plot, note],
                    api_name="clear")
        for trigger in (image.change, chatbot.clear):
            trigger(handlers.reset_chat, inputs=None, outputs=[chatbot, session, router_plot, note],
                    api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue_size)
    return demo
