"""Checkpoint converters into this package's format.

    python -m parrot.convert official --src /models/Parrot-7B --dst runs/parrot-7b \\
        [--vision /models/clip-vit-large-patch14-336]

- `official`: a checkpoint saved by the official AIDC-AI/Parrot code (`parrot.convert.official`).
"""

from .official import ConversionError, convert_official

__all__ = ["ConversionError", "convert_official"]
