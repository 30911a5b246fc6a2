"""Chat templates: render conversations to text and tokenise them with training labels.

Two templates:

* "chatml" (Qwen / Qwen2, used by Parrot's Qwen-based models)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n

  Labels: the answer and its `<|im_end|>`; the role header and the newline after `<|im_end|>` are ignored.

* "llama" (Llama-2 chat as used by LLaVA's `llava_llama_2` conversation and Meta's reference code)::

    {bos}[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} {eos}{bos}[INST] {user2} [/INST] ...

  Labels: " {answer} " and `eos`. `bos`/`eos` default to "<s>"/"</s>"; `tokenize` (and
  `with_special_tokens(tokenizer)`) take them from the tokenizer instead (empty bos when it has none).

Truncation policy (`tokenize`): when the conversation is longer than `max_length`, whole trailing turns
(user + assistant) are dropped first; if the first turn alone is still too long it is cut token-wise at
`max_length`. Every `<image>` placeholder must survive, otherwise a ValueError names the record: a
placeholder is never cut (its visual features would be orphaned). `keeps_supervised_token` tells whether a
labelled token survives that truncation from a prefix of the conversation (the dataset's build-time check).

Segments are always tokenised each on its own (`segment_ids`; `segments_ids` does a conversation's segments in
one batched tokenizer call, which still tokenises every text separately), in training and at inference (`encode`)
alike: a byte-level BPE (Qwen2's) tokenising the rendered string whole can merge across a segment boundary (an
answer starting with "\n" after the assistant header) and give ids the model never saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# Jinja twin of ChatMLTemplate.render (set as `tokenizer.chat_template`; tests check the two agree).
CHATML_JINJA = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Segment:
    text: str
    labelled: bool  # trained on (assistant answer + end-of-turn)
    turn: int  # 0-based user/assistant exchange; the system prompt belongs to turn 0


def _split_system(messages: list[dict], system: str | None, default: str) -> tuple[str, list[dict]]:
    """The system prompt to use (explicit argument > system message > default) and the remaining messages."""
    rest = list(messages)
    own = None
    if rest and rest[0]["role"] == "system":
        own = rest.pop(0)["content"]
    for i, m in enumerate(rest):
        if m["role"] not in ("user", "assistant"):
            raise ValueError(f"message {i}: role {m['role']!r} not allowed here (system only first)")
    if system is not None:
        return system, rest
    return (own if own is not None else default), rest


def segment_ids(segment: Segment, tokenizer) -> list[int]:
    """The ids of one segment, tokenised on its own without special tokens added. Training (`tokenize`) and
    inference (`encode`) tokenise segments this way (batched: `segments_ids`, same ids), the build-time check
    (`keeps_supervised_token`) one at a time here, so they agree: a byte-level BPE can merge text across a segment
    boundary when the rendered string is tokenised whole."""
    return tokenizer(segment.text, add_special_tokens=False)["input_ids"]


def segments_ids(segments: list[Segment], tokenizer) -> list[list[int]]:
    """`segment_ids` of every segment, from one batched tokenizer call (`tokenizer([text, ...])`, as a Hugging Face
    tokenizer takes a batch). Why: `tokenize` and `encode` tokenise every segment of a conversation (ChatML: 4 per
    exchange and the system block), and each call costs ~0.1 ms of Python around the tokeniser, more than tokenising
    a short text; one call per conversation made `tokenize` ~4x and `ConversationDataset.__getitem__` (image
    included) ~1.4x faster on the synthetic data (benchmarks/_explore/s11a/getitem_ab.py). The ids are those of
    `segment_ids`: a batch never merges across its texts (each is encoded on its own), empty and whitespace-only texts
    included (tests compare both paths). The tokenizer must accept a list of texts and give one list of ids per
    text."""
    if not segments:
        return []
    ids = tokenizer([seg.text for seg in segments], add_special_tokens=False)["input_ids"]
    if len(ids) != len(segments):  # a tokenizer that took the list as one text would misalign every label
        raise ValueError(f"tokenizer gave {len(ids)} id lists for a batch of {len(segments)} texts; it must accept a "
                         "list of texts (as Hugging Face tokenizers do)")
    return ids


def control_token_strings(tokenizer) -> tuple[str, ...]:
    """Texts `tokenizer` turns into control tokens wherever they appear in a string (its special tokens and added
    special tokens: chat scaffolding such as "<|im_end|>", end of text, the image placeholder), longest first. Inside
    message content such a text would be read as the control token itself (as HF's chat templates do), e.g. a
    literal "<|im_end|>" in an answer ends the turn there."""
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return tuple(sorted((special | set(tokenizer.all_special_tokens)) - {""}, key=lambda s: (-len(s), s)))


def reserved_prompt_texts(tokenizer) -> tuple[str, ...]:
    """Texts a prompt written by a user or read from a benchmark may not spell (the demo, MMMB and the VLMEvalKit
    adapter refuse them): the tokenizer's control-token texts and the image placeholder, which the code places."""
    return tuple(sorted({*control_token_strings(tokenizer), IMAGE_TOKEN}))


PROBE_CHARS = 32  # head of an answer tokenised to learn whether it gives a token at all


def _yields_tokens(text: str, tokenizer, probe_chars: int = PROBE_CHARS) -> bool:
    """Whether `text` tokenises to at least one id, judged from its head when that gives one (a tokenizer that
    emits an id for a prefix emits one for the whole text): an answer's first token is all a check needs."""
    return bool(tokenizer(text[:probe_chars], add_special_tokens=False)["input_ids"]) \
        or bool(tokenizer(text, add_special_tokens=False)["input_ids"])


def _image_token_id(segments: list[Segment], tokenizer, image_token: str, name: str) -> int | None:
    """The placeholder's id when a segment holds the placeholder, else None; an error naming `name` when the
    tokenizer does not know it."""
    if not any(image_token in s.text for s in segments):
        return None
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"{name}: tokenizer has no {image_token!r} token; add it as a special token")
    return image_id


class PlaceholderCutError(ValueError):
    """Truncation would cut an image placeholder (its visual features would be orphaned)."""


def _cut_placeholder_error(name: str, max_length: int, image_token: str) -> PlaceholderCutError:
    return PlaceholderCutError(f"{name}: truncating to max_length={max_length} tokens would cut an {image_token!r} "
                               f"placeholder; raise max_length or shorten the text before the image")


@dataclass(frozen=True)
class ChatTemplate:
    """Base: subclasses build `Segment`s; rendering and tokenising are shared so they cannot disagree."""

    name: str
    default_system: str

    def segments(self, messages: list[dict], add_generation_prompt: bool = False,
                 system: str | None = None) -> list[Segment]:
        raise NotImplementedError

    def with_special_tokens(self, tokenizer) -> "ChatTemplate":
        """This template using `tokenizer`'s own bos/eos strings where the format needs them."""
        return self

    def render(self, messages: list[dict], add_generation_prompt: bool = False, system: str | None = None) -> str:
        """The conversation as one string; `system` overrides any system message and the default prompt."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt, system))

    def encode(self, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
               system: str | None = None) -> tuple[list[int], list[bool]]:
        """(input_ids, labelled): the ids training would see for `messages` (no truncation), and per id whether it
        is a labelled one (an assistant answer or its end-of-turn). Inference encodes prompts here, not by
        tokenising `render(...)` as one string, which can merge text across a segment boundary differently."""
        ids: list[int] = []
        labelled: list[bool] = []
        segments = self.with_special_tokens(tokenizer).segments(messages, add_generation_prompt, system)
        for seg, seg_ids in zip(segments, segments_ids(segments, tokenizer)):
            ids += seg_ids
            labelled += [seg.labelled] * len(seg_ids)
        return ids, labelled

    def tokenize(self, messages: list[dict], tokenizer, max_length: int, image_token: str = IMAGE_TOKEN,
                 system: str | None = None, record_id: str | None = None) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with labels = IGNORE_INDEX except on assistant answers and their end-of-turn.

        Segments are tokenised separately (`segments_ids`: one batched call, each text on its own, so labels align
        exactly) without adding special tokens.
        See the module docstring for the truncation policy; `record_id` names the record in errors.
        """
        name = record_id if record_id is not None else "<conversation>"
        segments = self.with_special_tokens(tokenizer).segments(messages, False, system)
        image_id = _image_token_id(segments, tokenizer, image_token, name)
        ids: list[int] = []
        labels: list[int] = []
        turn_start: dict[int, int] = {}
        for seg, seg_ids in zip(segments, segments_ids(segments, tokenizer)):
            turn_start.setdefault(seg.turn, len(ids))
            ids.extend(seg_ids)
            labels.extend(seg_ids if seg.labelled else [IGNORE_INDEX] * len(seg_ids))
        if len(ids) <= max_length:
            return ids, labels
        n_images = ids.count(image_id) if image_id is not None else 0
        # Drop whole trailing turns while they overflow and at least one turn remains.
        end = len(ids)
        for turn in sorted(turn_start, reverse=True):
            if end <= max_length or turn == 0:
                break
            end = turn_start[turn]
        end = min(end, max_length)
        ids, labels = ids[:end], labels[:end]
        if image_id is not None and ids.count(image_id) != n_images:
            raise _cut_placeholder_error(name, max_length, image_token)
        return ids, labels

    def check_texts(self, messages: list[dict], tokenizer, system: str | None = None) -> list[str]:
        """The texts `keeps_supervised_token` usually tokenises for `messages`: every segment before the first
        labelled one, and that one's head. A caller can tokenise them for many conversations in one batched call
        beforehand (the Python around each tokenizer call costs more than tokenising a short text); a text not
        foreseen here is simply tokenised on demand, so this is a speed hint and never changes a decision."""
        texts = []
        for seg in self.with_special_tokens(tokenizer).segments(messages, False, system):
            if seg.labelled:
                return texts + [seg.text[:PROBE_CHARS]]
            texts.append(seg.text)
        return texts

    def keeps_supervised_token(self, messages: list[dict], tokenizer, max_length: int,
                               image_token: str = IMAGE_TOKEN, system: str | None = None,
                               record_id: str | None = None) -> bool:
        """Whether `tokenize(...)` with these arguments keeps at least one labelled token; raises the ValueErrors it
        raises. Tokenises only the prefix that decides it (usually up to the first answer), not the conversation.

        By `tokenize`'s truncation policy a token at position q of turn t survives iff q < max_length and, for
        t >= 1, the whole turn t ends at or before max_length (trailing turns are dropped while they overflow,
        turn 0 is only cut token-wise). So segments are tokenised in order until a surviving labelled token has
        been seen and the fate of every placeholder is known, or the position passes max_length (nothing later
        survives). Placeholder ids are assumed to come only from segments whose text holds the placeholder.
        """
        name = record_id if record_id is not None else "<conversation>"
        segments = self.with_special_tokens(tokenizer).segments(messages, False, system)
        image_id = _image_token_id(segments, tokenizer, image_token, name)
        last_image = max((i for i, s in enumerate(segments) if image_id is not None and image_token in s.text),
                         default=-1)
        pos = 0  # tokens before segment i
        supervised = False  # a labelled token is known to survive
        waiting_labelled = waiting_image = False  # seen in the current turn t >= 1: survive iff it fits whole
        for i, seg in enumerate(segments):
            if seg.turn == 0 and seg.labelled and pos < max_length and i > last_image \
                    and _yields_tokens(seg.text, tokenizer):
                return True  # its first token survives, and every placeholder lies before it and survives
            ids = segment_ids(seg, tokenizer)
            cut = False
            if seg.turn == 0:
                supervised |= seg.labelled and bool(ids) and pos < max_length
                cut = image_id in ids[max(0, max_length - pos):]
            else:
                waiting_labelled |= seg.labelled and bool(ids)
                waiting_image |= image_id in ids
            pos += len(ids)
            if seg.turn > 0 and (i + 1 == len(segments) or segments[i + 1].turn != seg.turn):  # turn ends here
                supervised |= waiting_labelled and pos <= max_length
                cut |= waiting_image and pos > max_length
                waiting_labelled = waiting_image = False
            if pos > max_length:  # what waits in this turn and every later placeholder is lost
                later = segments[i + 1:last_image + 1]
                cut |= waiting_image or any(image_id in segment_ids(s, tokenizer) for s in later)
            if cut:
                raise _cut_placeholder_error(name, max_length, image_token)
            if pos > max_length or (supervised and i >= last_image and not waiting_image):
                return supervised
        return supervised


@dataclass(frozen=True)
class ChatMLTemplate(ChatTemplate):
    name: str = "chatml"
    default_system: str = DEFAULT_SYSTEM_PROMPT

    def segments(self, messages, add_generation_prompt=False, system=None):
        system_text, rest = _split_system(messages, system, self.default_system)
        # Always a system block, also an empty one (as Qwen's and our tokenizer's chat template render it)
        segs = [Segment(f"<|im_start|>system\n{system_text}<|im_end|>\n", False, 0)]
        turn = 0
        for i, m in enumerate(rest):
            if m["role"] == "user":
                turn = turn + 1 if i > 0 else 0
                segs.append(Segment(f"<|im_start|>user\n{m['content']}<|im_end|>\n", False, turn))
            else:
                segs.append(Segment("<|im_start|>assistant\n", False, turn))
                segs.append(Segment(f"{m['content']}<|im_end|>", True, turn))
                segs.append(Segment("\n", False, turn))
        if add_generation_prompt:
            segs.append(Segment("<|im_start|>assistant\n", False, turn))
        return segs


@dataclass(frozen=True)
class Llama2Template(ChatTemplate):
    name: str = "llama"
    default_system: str = LLAMA2_SYSTEM_PROMPT
    bos: str = "<s>"
    eos: str = "</s>"

    def with_special_tokens(self, tokenizer):
        return replace(self, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "")

    def segments(self, messages, add_generation_prompt=False, system=None):
        # The generation prompt is implicit: a rendered conversation ending in "[/INST]" awaits the answer.
        system_text, rest = _split_system(messages, system, self.default_system)
        segs = []
        turn = 0
        for i, m in enumerate(rest):
            if m["role"] == "user":
                turn = turn + 1 if i > 0 else 0
                content = m["content"].strip()
                if i == 0 and system_text:
                    content = f"<<SYS>>\n{system_text}\n<</SYS>>\n\n{content}"
                segs.append(Segment(f"{self.bos}[INST] {content} [/INST]", False, turn))
            else:
                segs.append(Segment(f" {m['content'].strip()} {self.eos}", True, turn))
        return segs


TEMPLATES = {"chatml": ChatMLTemplate(), "qwen": ChatMLTemplate(), "llama": Llama2Template(),
             "llama2": Llama2Template()}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def llava_to_messages(conversations: list[dict], record_id: str | None = None) -> list[dict]:
    """LLaVA turns [{"from": "human"|"gpt"|"system", "value": ...}] -> [{"role", "content"}].

    Checks the shape a training conversation must have: optional system first, then user/assistant
    alternating, starting with user. Errors name the record and the turn index.
    """
    name = record_id if record_id is not None else "<conversation>"
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{name}: conversation turn {i} needs 'from' and 'value' fields, got {turn!r}")
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"{name}: conversation turn {i} has unknown 'from' {turn['from']!r}; "
                             f"expected one of {sorted(LLAVA_ROLES)}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"{name}: conversation turn {i} 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError(f"{name}: conversation has no user/assistant turns")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            hint = ("; drop that leading assistant turn (ConversationDataset does, as LLaVA's preprocessing, and "
                    "counts it in its BadDataReport)") if i == 0 else ""
            raise ValueError(f"{name}: turns must alternate user/assistant starting with user; "
                             f"turn {i + len(messages) - len(body)} is {m['role']!r}{hint}")
    return messages
