"""Uploaded file -> checked RGB image, or a `BadImageError` whose message can be shown to the user as is.

The demo receives the raw upload (a path in Gradio's cache), not an image Gradio already decoded, so that a
non-image file, a truncated file or a decompression bomb becomes a message in the chat instead of a server error.

The model gets the picture the user sees: transparent parts are laid on white (as the page shows them; a plain RGB
conversion would show the model the colours hidden under the alpha, e.g. black line art on transparent -> all black),
and an animated or multi-page image is refused instead of silently answering about its first frame only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..data.images import BadImageError, load_image

# The model sees a few hundred pixels a side; anything above ~40 megapixels (e.g. 10000x10000) is refused
# before decoding, because decoding it costs hundreds of MB per request.
MAX_UPLOAD_PIXELS = 40_000_000
# The "pad" aspect mode pads to a square canvas of the longest side before resizing, so a thin image passes the
# pixel limit and still costs side**2 pixels (40x1000000 -> 10^12). Refused before decoding: a longest side over
# 8192 pixels (the canvas stays <= 67 megapixels, ~200 MB) or sides more than 20:1 apart (panoramas are ~4:1).
MAX_UPLOAD_SIDE = 8192
MAX_UPLOAD_ASPECT_RATIO = 20.0
MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # also passed to Gradio as its upload limit
# A JPEG with an MPF index (most phone and camera photos) opens as "MPO": frame 0 is the photo, the rest previews.
_STILL_MULTI_FRAME_FORMATS = ("MPO",)


def upload_path(payload: Any) -> tuple[Path, str] | None:
    """A Gradio image payload (FileData dict, as sent when preprocessing is off) or a path -> (path, display name)."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        if not payload.get("path"):
            raise BadImageError("the upload has no file path; please upload the image again")
        path = Path(payload["path"])
        return path, str(payload.get("orig_name") or path.name)
    path = Path(payload)
    return path, path.name


def open_upload(payload: Any, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image | None:
    """The uploaded image as RGB (None when nothing was uploaded); BadImageError naming the file otherwise."""
    located = upload_path(payload)
    if located is None:
        return None
    path, name = located
    if not path.is_file():
        raise BadImageError(f"{name}: uploaded file not found on the server; please upload it again")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise BadImageError(f"{name}: file too large ({path.stat().st_size / 2**20:.0f} MB, limit "
                            f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own, lower limit
            with Image.open(path) as probe:  # reads the header (and the frame index) only, no pixels
                width, height = probe.size
                check_size(name, width, height, max_pixels)
                frames = 1 if probe.format in _STILL_MULTI_FRAME_FORMATS else getattr(probe, "n_frames", 1)
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: not an image file Pillow can read ({type(err).__name__})") from err
    except (OSError, EOFError, SyntaxError) as err:  # also a frame index that breaks off
        raise BadImageError(f"{name}: cannot read the image ({err})") from err
    if frames > 1:
        raise BadImageError(f"{name}: an animated or multi-page image ({frames} frames); the model reads one still "
                            "image, please upload a single frame (e.g. as PNG or JPEG)")
    try:
        return load_image(path, name=name)  # transparency laid on white, as the page shows it (`images.to_rgb`)
    except MemoryError as err:  # the limits above should prevent it; a server error must not be the answer
        raise BadImageError(f"{name}: not enough memory to decode this {width}x{height} image; "
                            "please upload a smaller one") from err


def check_size(name: str, width: int, height: int, max_pixels: int = MAX_UPLOAD_PIXELS) -> None:
    """BadImageError naming the limit when a `width` x `height` image is too large or too thin to prepare."""
    if width * height > max_pixels:
        raise BadImageError(
            f"{name}: image too large ({width}x{height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels)"
        )
    if max(width, height) > MAX_UPLOAD_SIDE:
        raise BadImageError(f"{name}: image too large ({width}x{height} pixels; the longest side may be at most "
                            f"{MAX_UPLOAD_SIDE} pixels)")
    if max(width, height) > MAX_UPLOAD_ASPECT_RATIO * max(min(width, height), 1):
        raise BadImageError(f"{name}: image too narrow ({width}x{height} pixels; the sides may be at most "
                            f"{MAX_UPLOAD_ASPECT_RATIO:.0f}:1 apart)")
