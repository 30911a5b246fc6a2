"""The Parrot MLLM. Importing this package registers it with `AutoConfig` / `AutoModelForCausalLM`."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import OpenCLIPVisionConfig, ParrotConfig
from .modeling import ParrotCausalLMOutput, ParrotForCausalLM


def _register() -> None:
    for config_cls in (OpenCLIPVisionConfig, ParrotConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(ParrotConfig, ParrotForCausalLM, exist_ok=True)


_register()

__all__ = ["OpenCLIPVisionConfig", "ParrotConfig", "ParrotForCausalLM", "ParrotCausalLMOutput"]
