"""`python -m parrot.train --stage 1|2 ...` (see `--help`)."""

import sys

from .config import parse_args
from .run import train
from .trainer import NonFiniteLossError


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
