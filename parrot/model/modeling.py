"""`ParrotForCausalLM`: vision tower -> projector -> Parrot MoE -> visual tokens spliced into any HF causal LM.

Data flow for a batch (B samples, n images in total, N_v visual tokens per image):

    pixel_values (n, 3, H, W) --VisionTower--> (n, N_v, D_v) --mm_projector--> (n, N_v, D)
        --ParrotMoEProjector (text-guided by each image's own prompt, only when use_moe)--> (n, N_v, D)
    input_ids (B, T) --embed--> (B, T, D) --merge at <image> placeholders--> (B, T', D) --language_model--> logits

`generate()` runs this once on the prompt and hands the merged embeddings to HF generation (KV cache, greedy,
sampling, beams...). Because the prompt is passed as embeddings, `generate()` returns only the new tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from ..moe.experts import SwiGLUExperts
from .configuration import OpenCLIPVisionConfig, ParrotConfig
from .merge import IGNORE_INDEX, merge_visual_tokens, placeholder_mismatch
from .parrot_moe import ParrotMoEProjector
from .projector import build_projector
from .vision import VisionTower, load_pretrained_vision_model


@dataclass
class ParrotCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus what the multimodal prefill produced.

    router_probs: (n_images, E) Parrot MoE routing distribution per image (None when the MoE is off).
    attention_mask: (B, T') the mask after splicing in visual tokens (None when no image was given).
    """

    router_probs: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def is_left_padded(attention_mask: torch.Tensor) -> bool:
    """Every row of a (B, T) mask ends with a real token: left padding, or none (one host sync)."""
    return bool(attention_mask[:, -1].all())


@dataclass
class MultimodalInputs:
    inputs_embeds: torch.Tensor  # (B, T', D)
    attention_mask: torch.Tensor  # (B, T')
    labels: torch.Tensor | None  # (B, T')
    router_probs: torch.Tensor | None  # (n_images, E)


class ParrotPreTrainedModel(PreTrainedModel):
    config: ParrotConfig
    config_class = ParrotConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """The projector and the MoE get PyTorch's default init (nn.Linear: U(-b, b), b = 1/sqrt(fan_in), the bias
        too), as in the official Parrot / LLaVA code, which creates them after loading the LLM; everything else the
        HF default, normal(0, initializer_range). With the LLM's normal(0, 0.02), 4096-wide experts start with ~12x
        the output of the official ones, so the random experts, not the residual, would dominate the visual tokens
        at the start of stage 2."""
        if not self._is_projector_or_moe(module):
            super()._init_weights(module)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, SwiGLUExperts):
            for weight, bound in module.default_init_bounds():
                init.uniform_(weight, -bound, bound)

    def _is_projector_or_moe(self, module: nn.Module) -> bool:
        """Whether `module` is part of this model's projector or MoE, looked up at call time: a set of module ids
        taken in __init__ would go stale in a deep copy or an unpickled model (its modules are new objects)."""
        parts = [self._modules.get(name) for name in ("mm_projector", "moe")]  # None before __init__ builds them
        return any(module is part_module for part in parts if part is not None for part_module in part.modules())


class ParrotForCausalLM(ParrotPreTrainedModel, GenerationMixin):
    def __init__(
        self, config: ParrotConfig, language_model: PreTrainedModel | None = None, vision_model: nn.Module | None = None
    ):
        """`language_model` / `vision_model`: already-loaded parts (see `from_parts`); built from config if None."""
        config.check_model_settings()
        super().__init__(config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.vision_tower = VisionTower(config, vision_model)
        self.mm_projector = build_projector(config)
        self.moe = ParrotMoEProjector(config)
        for loaded in (language_model, vision_model):
            for tensor in loaded.state_dict(keep_vars=True).values() if loaded is not None else ():
                tensor._is_hf_initialized = True  # post_init must not overwrite loaded weights
        self.post_init()

    # --- HF plumbing: the language model owns the embeddings and the head -------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # --- multimodal prefill -------------------------------------------------------------------------------------
    def _visual_path_on_every_rank(self) -> bool:
        """True under DeepSpeed ZeRO-3 with several processes. There every module's forward all-gathers its
        partitioned weights, a collective: a process whose batch has no image must still run the tower, projector and
        MoE, or its collectives no longer match the others' (gloo aborts with a size mismatch, NCCL hangs). This is
        why LLaVA gives text-only samples a blank image, and the official Parrot code runs the MoE on them."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return False
        return hasattr(next(self.vision_tower.parameters()), "ds_id")  # a ZeRO-3 partitioned parameter

    def _with_idle_visual_path(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """inputs_embeds (B, T, D) unchanged in value, joined to the visual path run on one blank image: an empty
        slice of its tokens is appended, so every trained part of that path gets a (zero) gradient as well."""
        size = self.config.image_size
        visual = self.encode_images(inputs_embeds.new_zeros(1, 3, size, size))  # (1, N_v, D)
        if self.config.use_moe:
            no_text = torch.zeros(1, inputs_embeds.shape[1], dtype=torch.bool, device=inputs_embeds.device)
            visual, _ = self.moe(visual, inputs_embeds[:1], no_text)
        empty = visual[:, :0].to(inputs_embeds.dtype).expand(inputs_embeds.shape[0], 0, -1)  # (B, 0, D)
        return torch.cat([inputs_embeds, empty], dim=1)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (n, 3, H, W) -> projected visual tokens (n, N_v, D) (before the MoE).

        The tower's features go to the projector in the projector's dtype: a frozen tower is often kept in half
        precision beside a float32 projector (as LLaVA does)."""
        features = self.vision_tower(pixel_values)  # (n, N_v, D_v), the tower's dtype
        weight = next(self.mm_projector.parameters(), None)  # None for the identity projector
        return self.mm_projector(features if weight is None else features.to(weight.dtype))

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> MultimodalInputs:
        """Embed text, encode images, route them through the MoE by their prompt, and splice them in.

        The padding side of the output follows the input: a batch whose last column is all real tokens is
        treated as left-padded (generation, next-token scoring), otherwise as right-padded (training).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.bool()
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        visual = self.encode_images(pixel_values)  # (n, N_v, D)
        is_image = (input_ids == self.config.image_token_id) & valid
        router_probs = None
        if self.config.use_moe:
            text_mask = valid & ~is_image  # (B, T): prompt tokens only
            if labels is not None:
                text_mask &= labels == IGNORE_INDEX
            image_sample, _ = torch.nonzero(is_image, as_tuple=True)  # (n,) sample of each image, reading order
            if image_sample.numel() != visual.shape[0]:
                raise placeholder_mismatch(is_image, visual.shape[0], self.config.image_token_id)
            visual, routing = self.moe(visual, inputs_embeds[image_sample], text_mask[image_sample])
            router_probs = routing.probs
        padding_side = "left" if is_left_padded(valid) else "right"
        merged = merge_visual_tokens(
            inputs_embeds, input_ids, attention_mask, visual, self.config.image_token_id, labels, padding_side
        )
        return MultimodalInputs(merged.inputs_embeds, merged.attention_mask, merged.labels, router_probs)

    @can_return_tuple  # return_dict=False (argument or config): the output as a tuple, HF's convention
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ParrotCausalLMOutput:
        """input_ids (B, T) with one `<image>` token per image, pixel_values (n_images, 3, H, W)."""
        if "past_key_values" in kwargs:  # the pre-5.x name
            cache = kwargs.pop("past_key_values")
        if pixel_values is not None and pixel_values.shape[0] == 0:  # no image in the batch
            pixel_values = None
        router_probs = merged_mask = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids with '<image>' placeholders, not inputs_embeds")
            if position_ids is not None:  # they would number the sequence before the visual tokens are spliced in
                raise ValueError("position_ids cannot be given with pixel_values: each '<image>' becomes "
                                 f"{self.config.num_image_tokens} positions; leave position_ids out")
            prep = self.prepare_multimodal_inputs(input_ids, attention_mask, pixel_values, labels)
            input_ids, inputs_embeds, labels = None, prep.inputs_embeds, prep.labels
            attention_mask = merged_mask = prep.attention_mask
            router_probs = prep.router_probs
        elif input_ids is not None and bool((input_ids == self.config.image_token_id).any()) and cache is None:
            raise ValueError("input_ids contain '<image>' placeholders but no pixel_values were given")
        elif cache is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            # A decoding step after a prefill with images: the cache holds the merged sequence (each <image> took
            # num_image_tokens positions), so the mask must extend the merged mask (output.attention_mask), not the
            # prompt's; a shorter one is not refused by the LLM and silently masks the wrong positions.
            past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
            new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if attention_mask.shape[1] < past + new:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} positions but the cache holds {past} and {new} "
                    "new token(s) follow: after a prefill with images, extend the merged mask the model returned "
                    "(output.attention_mask), not the prompt's"
                )
        if pixel_values is None and input_ids is not None and self._visual_path_on_every_rank() and (
                cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)):  # no decode step
            input_ids, inputs_embeds = None, self._with_idle_visual_path(self.get_input_embeddings()(input_ids))
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
                and bool(attention_mask[:, -1].all() & ~attention_mask.all()):  # left padding, some pads: one sync
            # Left padding (likelihood scoring, a hand-written decoding loop): number each row's real tokens from 0,
            # as generate() does. The LM's default arange(T) starts a row at its pad count, which RoPE forgives but
            # learned absolute positions (GPT-2, OPT, ...) do not: the scores would depend on the batch.
            new = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
        out = self.language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,  # read by name below
            **kwargs,
        )
        return ParrotCausalLMOutput(
            loss=out.loss,
            logits=out.logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_probs=router_probs,
            attention_mask=merged_mask,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        prompt_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Generate from a left-padded prompt batch; returns only the new tokens (B, n_new).

        `prompt_labels` (B, T): the prompt's labels as training would have them (earlier assistant answers of a
        multi-turn chat keep their ids, the rest is IGNORE_INDEX), so the MoE router skips those answers as it
        does in training; None routes by the whole prompt.

        `max_length` / `min_length` count the prompt as given (`input_ids`, T tokens), as with a text-only HF model:
        they become `max_new_tokens` / `min_new_tokens` = length - T. (HF would count them over the merged
        embeddings it receives, where each image takes num_image_tokens positions.)

        The prompt reaches HF generation as embeddings (as in LLaVA), so the logits processors that read token ids
        (`repetition_penalty`, `no_repeat_ngram_size`) see the generated tokens only, not the prompt's.
        """
        if getattr(self.config.text_config, "output_router_logits", False):
            # An MoE LLM configured for its load-balancing loss (training) would compute it at every decoding step,
            # and transformers' version fails there (the cached steps' router logits do not match the mask).
            kwargs.setdefault("output_router_logits", False)
        if input_ids is None:
            return super().generate(attention_mask=attention_mask, **kwargs)
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if kwargs.get(total) is not None and kwargs.get(new) is None:
                length = kwargs.pop(total)
                if total == "max_length" and length <= input_ids.shape[1]:
                    raise ValueError(f"generate(max_length={length}) leaves no room after the {input_ids.shape[1]}"
                                     "-token prompt (max_length counts the prompt's input_ids); use max_new_tokens")
                kwargs[new] = max(length - input_ids.shape[1], 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is not None and pixel_values.shape[0] == 0:  # no image in the batch
            pixel_values = None
        # The prompt goes to HF generation as embeddings, so its right-padding warning never fires: check here,
        # with or without images (right padding would decode the short prompts after their padding).
        if not is_left_padded(attention_mask):
            raise ValueError("generate() needs left padding (set padding_side='left' in the processor)")
        if pixel_values is not None:
            prep = self.prepare_multimodal_inputs(input_ids, attention_mask, pixel_values, prompt_labels)
            inputs_embeds, attention_mask = prep.inputs_embeds, prep.attention_mask
        else:
            if bool(((input_ids == self.config.image_token_id) & attention_mask.bool()).any()):
                raise ValueError("input_ids contain '<image>' placeholders but no pixel_values were given")
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if self._visual_path_on_every_rank():
                inputs_embeds = self._with_idle_visual_path(inputs_embeds)
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # --- building from real checkpoints on local disk -------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        llm_path: str,
        vision_path: str,
        image_token_id: int,
        vision_config: OpenCLIPVisionConfig | None = None,
        vocab_size: int | None = None,
        **parrot_kwargs,
    ) -> "ParrotForCausalLM":
        """Stage-1 starting point from a local causal-LM checkpoint and a local vision tower.

        `vision_path`: an HF CLIP/CLIPVision checkpoint directory, or (with `vision_config` an
        `OpenCLIPVisionConfig`) an open_clip state-dict file. Projector and MoE are freshly initialised.
        `vocab_size`: grow the LLM's embeddings to at least this size first (after adding `<image>` to its
        tokenizer). Never shrink them: a padded vocabulary (Qwen: 151936 rows for ~151646 tokens) keeps its rows,
        which are trained weights and already have one for `<image>`.
        """
        language_model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
        if vocab_size is not None and vocab_size > language_model.get_input_embeddings().num_embeddings:
            language_model.resize_token_embeddings(vocab_size)
        if vision_config is None:
            vision_config = AutoConfig.from_pretrained(vision_path)
            vision_config = getattr(vision_config, "vision_config", vision_config)  # a full CLIPConfig
        config = ParrotConfig(
            text_config=language_model.config, vision_config=vision_config, image_token_id=image_token_id,
            **parrot_kwargs,
        )
        vision_model = load_pretrained_vision_model(vision_path, vision_config)
        return cls(config, language_model=language_model, vision_model=vision_model)
