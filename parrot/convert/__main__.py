"""Command line: `python -m parrot.convert official --src DIR --dst DIR [--vision DIR]`."""

from __future__ import annotations

import argparse
import logging
import sys

from ..fileio import positive_int
from .official import ConversionError, convert_official


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parrot.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    official = commands.add_parser("official", help="a checkpoint saved by the official AIDC-AI/Parrot code")
    official.add_argument("--src", required=True, help="official checkpoint dir (config.json, weights, tokenizer)")
    official.add_argument("--dst", required=True, help="output dir (our model + processor)")
    official.add_argument("--vision", help="local HF CLIP checkpoint dir: the tower's config, image normalisation "
                                           "and, when the checkpoint has none, its weights")
    official.add_argument("--template", default="chatml", help="chat template of the processor (default chatml)")
    official.add_argument("--model-max-length", type=positive_int,
                          help="processor length limit (default: the checkpoint's tokenizer_model_max_length, "
                               "else 2048)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dst = convert_official(args.src, args.dst, args.vision, args.template, args.model_max_length)
    except (ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
