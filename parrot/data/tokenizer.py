"""A tiny byte-level BPE tokenizer for offline experiments, trained on the synthetic world's six languages.

Byte-level BPE (as GPT-2 / Qwen) never produces unknown tokens; training merges on all six languages keeps
Chinese, Arabic and Russian from degrading to 2-3 byte tokens per character. Special tokens follow Qwen's ChatML
convention (`<|endoftext|>` pads, `<|im_end|>` ends an assistant turn and is the EOS) plus an atomic `<image>`
placeholder that the model replaces with visual tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .synthetic import corpus_texts
from .templates import CHATML_JINJA, DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, LLAMA2_SYSTEM_PROMPT

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN)  # ids 0..3, in this order

# Text the model sees around the data: template scaffolding and common evaluation instructions.
_SCAFFOLD_TEXTS = (
    DEFAULT_SYSTEM_PROMPT,
    LLAMA2_SYSTEM_PROMPT,
    "system\nuser\nassistant\n[INST] <<SYS>>\n<</SYS>>\n\n [/INST] ",
    "Answer with the option's letter from the given choices directly.",
    "Answer the question using a single word or phrase.",
    "A. B. C. D. Options: Question: Hint: Answer:",
)


def build_tiny_tokenizer(vocab_size: int = 2000, seed: int = 0, n_texts: int = 6000,
                         model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus_texts(seed, n_texts)` and wrap it as a `PreTrainedTokenizerFast`.

    Deterministic for (vocab_size, seed, n_texts). pad = `<|endoftext|>`, eos = `<|im_end|>`, no bos;
    `<image>` is a special token (never split). A ChatML `chat_template` is attached, so
    `apply_chat_template` agrees with `parrot.data.templates.get_template("chatml").render`.
    """
    texts = list(_SCAFFOLD_TEXTS) + corpus_texts(seed, n_texts)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        extra_special_tokens=[IM_START, IMAGE_TOKEN],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer
