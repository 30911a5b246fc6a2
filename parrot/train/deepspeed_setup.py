"""DeepSpeed settings checked before training: can this machine run the config, and does it keep the Trainer's
optimizer?

- Preflight (`check_cpu_adam_available`; `TrainConfig` runs it before any model is built, `ParrotTrainer` again for
  trainers built without a TrainConfig): a config that offloads the optimizer (ZeRO-Offload,
  configs/deepspeed/zero3_offload.json) trains with DeepSpeed's CPU Adam, whose C++ op `cpu_adam` DeepSpeed
  JIT-compiles on first use unless it was prebuilt. Without a C++ compiler, ninja or the Python headers that build
  fails deep inside DeepSpeed, after the model is loaded; the preflight refuses such a run at once, naming the
  config file and the missing tool. It never builds the op (~2 min).
- `warn_about_deepspeed_optimizer`: a config with its own "optimizer" section changes weight decay and the logged lr.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..fileio import read_json_mapping

logger = logging.getLogger("parrot.train")


# Offload devices for which DeepSpeed steps the optimizer with CPU Adam (its engine's zero_use_cpu_optimizer)
CPU_OPTIMIZER_OFFLOAD = ("cpu", "nvme")
CPU_ADAM_OP = "cpu_adam"


class DeepSpeedSetupError(ValueError):
    """This machine cannot run the DeepSpeed config. A ValueError, so `parse_args` reports it as a usage error."""


def optimizer_offload_device(ds_config: dict) -> str | None:
    """The device of zero_optimization.offload_optimizer ("cpu", "nvme"), None without an optimizer offload."""
    zero = ds_config.get("zero_optimization") or {}
    device = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    return None if device == "none" else device


def needs_cpu_adam(ds_config: dict) -> bool:
    """Whether training under `ds_config` loads DeepSpeed's cpu_adam op: an optimizer offload to CPU / NVMe makes
    accelerate swap the Trainer's AdamW for DeepSpeedCPUAdam, unless "zero_force_ds_cpu_optimizer" is false (then the
    torch optimizer runs on the CPU) and the config has no "optimizer" section of its own (DeepSpeed's Adam)."""
    if optimizer_offload_device(ds_config) not in CPU_OPTIMIZER_OFFLOAD:
        return False
    return ds_config.get("zero_force_ds_cpu_optimizer", True) is not False or "optimizer" in ds_config


@dataclass(frozen=True)
class OpBuildTools:
    """The tools a JIT build of a DeepSpeed C++ op uses (`torch.utils.cpp_extension.load`), where found (None:
    missing). torch compiles with $CXX, else exactly `c++` (its ninja file names it; a lone g++ is not used),
    DeepSpeed's `jit_load` requires ninja before anything else, even to load a build cached by an earlier run,
    and the sources include Python.h from sysconfig's include directory. (A build cached by an earlier run on this
    machine is not looked for: a machine that built it has the tools.)"""

    compiler_name: str
    compiler: str | None
    ninja: str | None
    python_headers: str | None
    headers_dir: str
    compiler_from_env: bool = False  # compiler_name came from $CXX
    gxx: str | None = None  # a g++ on PATH: what to set CXX to when `c++` is missing

    def missing(self) -> list[str]:
        """What is missing to build (or load a JIT-built) op."""
        missing = [] if self.ninja else ["ninja (pip install ninja, or apt-get install ninja-build) is not on PATH"]
        if not self.compiler and self.compiler_from_env:
            missing.append(f"a C++ compiler: $CXX={self.compiler_name!r} is not an executable (on PATH)")
        elif not self.compiler:
            hint = f"; g++ is at {self.gxx}: export CXX=g++" if self.gxx else ""
            missing.append(f"a C++ compiler: {self.compiler_name!r} is not on PATH and $CXX is not set{hint} "
                           "(apt-get install g++)")
        if not self.python_headers:
            missing.append(f"the Python headers: no Python.h in {self.headers_dir} (apt-get install "
                           f"python{sys.version_info.major}.{sys.version_info.minor}-dev)")
        return missing


def find_build_tools() -> OpBuildTools:
    """Look up the compiler ($CXX or c++), ninja and Python.h the way torch's JIT build will (PATH of this process)."""
    compiler_name = os.environ.get("CXX") or "c++"
    headers_dir = sysconfig.get_path("include", scheme="nt" if os.name == "nt" else "posix_prefix") or ""
    header = Path(headers_dir) / "Python.h"
    return OpBuildTools(compiler_name=compiler_name, compiler=shutil.which(compiler_name), ninja=shutil.which("ninja"),
                        python_headers=str(header) if headers_dir and header.is_file() else None,
                        headers_dir=headers_dir, compiler_from_env=bool(os.environ.get("CXX")), gxx=shutil.which("g++"))


def cpu_adam_prebuilt() -> bool:
    """The op was compiled when DeepSpeed was installed (DS_BUILD_CPU_ADAM=1) for this accelerator: then DeepSpeed
    imports it (`OpBuilder.load`) and no tool is needed."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    return bool(installed_ops.get(CPU_ADAM_OP, False)) and accelerator_name == get_accelerator()._name


def check_cpu_adam_available(ds_config: dict, source: str) -> None:
    """Raise `DeepSpeedSetupError` naming `source` (the config file) and what is missing when `ds_config` needs
    DeepSpeed's cpu_adam op and it is neither prebuilt nor buildable here; never builds it."""
    if not needs_cpu_adam(ds_config):
        return
    device = optimizer_offload_device(ds_config)
    intro = (f"{source}: offload_optimizer device {device!r} trains with DeepSpeed's CPU Adam, whose C++ op "
             f"{CPU_ADAM_OP!r}")
    if importlib.util.find_spec("deepspeed") is None:
        raise DeepSpeedSetupError(f"{intro} comes with DeepSpeed, which is not installed (pip install deepspeed)")
    if cpu_adam_prebuilt():
        return
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    if not builder.is_compatible():
        raise DeepSpeedSetupError(f"{intro} cannot be built on this machine: {builder.error_log or 'incompatible'}")
    missing = find_build_tools().missing()
    if missing:
        raise DeepSpeedSetupError(
            f"{intro} is not prebuilt, and DeepSpeed would compile it when training starts (after the model is "
            f"loaded), which needs what this machine lacks: {'; '.join(missing)}. Install those, prebuild the op "
            "(DS_BUILD_CPU_ADAM=1 pip install deepspeed), or train without optimizer offload "
            "(configs/deepspeed/zero3.json)")


def check_deepspeed_config(path: str | Path) -> None:
    """Read a DeepSpeed config JSON and run the preflight on it; an unreadable file is a ValueError naming it."""
    check_cpu_adam_available(read_json_mapping(Path(path), "a DeepSpeed config (--deepspeed)"), str(path))


def warn_about_deepspeed_optimizer(args) -> None:
    """A DeepSpeed config with an "optimizer" section makes HF hand DeepSpeed one group of every trainable parameter
    (weight decay on biases and norms too, unlike the Trainer's own groups) and lets the DeepSpeed engine step the
    lr scheduler inside the optimizer step (the logged learning rate is then the next step's). Without that section
    (the configs in configs/deepspeed), the Trainer builds AdamW with its parameter groups and, when the config
    offloads the optimizer, accelerate turns it into DeepSpeed's CPU Adam (AdamW mode) with the same groups."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is not None and "optimizer" in ds_config.config:
        logger.warning("the DeepSpeed config %s defines its own optimizer: weight decay (%g) applies to every trained "
                       "parameter, biases and norms included, and the logged learning rate is the next step's; "
                       "leave the optimizer to the Trainer (no \"optimizer\" section) to avoid both",
                       args.deepspeed, args.weight_decay)


def check_deepspeed_offload(args) -> None:
    """Refuse, naming the config and the missing tool, a DeepSpeed config that offloads the optimizer when DeepSpeed's
    cpu_adam op is neither prebuilt nor buildable here (`parrot.train.config.check_cpu_adam_available`): otherwise the
    op's JIT build fails inside DeepSpeed's engine setup, at the first `train()` call. For a trainer built without
    `TrainConfig` (which checks before the model is loaded)."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is not None:
        source = args.deepspeed if isinstance(args.deepspeed, str) else "the DeepSpeed config"
        check_cpu_adam_available(ds_config.config, str(source))
