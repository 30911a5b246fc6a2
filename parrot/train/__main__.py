"""`python -m parrot.train --stage 1|2 ...` (see `--help`)."""

import sys

import torch

from .config import parse_args
from .run import OutputFolderInUse, train
from .trainer import NonFiniteLossError


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except OutputFolderInUse as err:  # the message says what to do: no traceback to read past
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        # A process group left to interpreter shutdown can abort the process after a finished run (gloo's threads:
        # "terminate called without an active exception", SIGABRT under torchrun): close it while all is alive.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
