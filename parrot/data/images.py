"""Image loading and the CLIP input transform (LLaVA's `pad` mode, a plain `resize`, CLIP's own `crop`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Images above this many pixels are refused. Pillow's own decompression-bomb guard (PIL.Image.MAX_IMAGE_PIXELS, left
# at its default: a warning above ~89M pixels, DecompressionBombError above twice that) fires first in Image.open
# and is reported the same way, as a BadImageError naming the file. Large JPEGs are decoded at reduced size (`draft`).
MAX_IMAGE_PIXELS = 200_000_000
# Images whose longer side is more than this many times the shorter are refused (`check_aspect_ratio`). The "pad"
# mode pads to a square of the longer side before resizing, so a thin image costs up to this many times its own
# pixels (a 1x12000 PNG of a few KB would take a 12000x12000 canvas, ~430 MB, were large squares not built reduced:
# MAX_PAD_SIDE; "crop" mode resizes the shorter side up to the model's input size first), and at 50:1 the content
# of a 336-pixel input is ~7 pixels thick already. Generous on purpose: panoramas are ~4:1, long screenshots and
# receipts ~10-20:1, text-line crops ~30:1. The demo applies its own, stricter limit to uploads
# (`parrot.serve.uploads`).
MAX_ASPECT_RATIO = 50
# "pad" mode (`pad_to_square_and_resize`): a padded square whose side is above MAX_PAD_SIDE pixels (a 48 MB RGB canvas)
# is not built; the image is first shrunk by an integer factor that leaves the square at least PAD_REDUCING_GAP times
# the output size (PIL's `reducing_gap`, whose documentation calls 3 indistinguishable from fair resampling in most
# cases), as PIL itself does with `resize(..., reducing_gap=PAD_REDUCING_GAP)`. Squares up to MAX_PAD_SIDE, i.e.
# every image whose longer side is at most 4096 (12 MP phone photos, 4K frames, COCO-sized images of LLaVA's mixes),
# are padded and resized exactly as LLaVA's expand2square + CLIP resize, bit for bit; so are square images (nothing
# to pad) and squares under 2 * PAD_REDUCING_GAP times the output size (no reduction by 2 possible).
MAX_PAD_SIDE = 4096
PAD_REDUCING_GAP = 4


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file (or upload) and the reason."""


class ImageAspectRatioError(BadImageError):
    """An image too thin to use: its sides are more than `MAX_ASPECT_RATIO` apart (or one of them is 0)."""


def check_aspect_ratio(width: int, height: int, name: str | None = None) -> None:
    """ImageAspectRatioError naming the image (`name`, e.g. its file) and both sides when the longer side is more
    than `MAX_ASPECT_RATIO` times the shorter; runs on the header's size, before any pixel is decoded."""
    short, long = min(width, height), max(width, height)
    if short < 1 or long > MAX_ASPECT_RATIO * short:
        where = f"{name}: " if name else ""
        ratio = f"{f'{long / short:.2f}'.rstrip('0').rstrip('.')}:1" if short >= 1 else "an empty side"
        raise ImageAspectRatioError(
            f"{where}image too thin ({width}x{height} pixels, {ratio}; the sides may be at most {MAX_ASPECT_RATIO}:1 "
            "apart: padding it to a square would cost up to that many times its pixels); crop or split it")


_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNG / TIFF


def has_transparency(image: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA) or a transparent colour / palette entries (`transparency` of P, L, RGB)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as the image is displayed: EXIF orientation applied (phone photos are stored sideways), 16-bit
    grey scaled to 8 bits (Pillow's convert("RGB") clips it, so everything above 255 would turn white), and
    transparency laid on white, as transformers' `convert_to_rgb` (CLIP's image processors) and the demo's upload
    path do: a plain convert("RGB") drops the alpha and shows the colours hidden under it (black line art on a
    transparent background, stored as transparent black, would turn all black)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":  # convert("RGB") clips floats to 0..255: a 0..1 image (the usual float scale) turns black
        raise ValueError("32-bit float pixels (mode F), whose scale (0..1 or 0..255) the file does not say; save the "
                         "image as 8- or 16-bit")
    if image.mode in _WIDE_GREY_MODES:
        raw = np.asarray(image)
        levels = np.clip(np.rint(raw.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
        grey = Image.fromarray(levels, mode="L")
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):  # a tRNS grey level: pixels of exactly that value are transparent
            grey.putalpha(Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8), mode="L"))
        image = grey
    if has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source: str | Path | Image.Image, name: str | None = None) -> Image.Image:
    """Open an image file (or take a PIL image) as RGB (`to_rgb`); raise BadImageError naming it on any failure,
    including an image above `MAX_IMAGE_PIXELS` or one whose sides are more than `MAX_ASPECT_RATIO` apart
    (ImageAspectRatioError, checked on the file's header before decoding).

    The file is closed before returning (an animated GIF/WebP otherwise keeps it open for seeking); of a
    multi-frame file the first frame is used, as LLaVA's `Image.open(path).convert("RGB")` does."""
    label = name or str(source)
    if isinstance(source, Image.Image):
        check_aspect_ratio(source.width, source.height, label)
        try:
            return to_rgb(source)
        except (OSError, ValueError) as err:
            raise BadImageError(f"{label}: cannot convert image to RGB ({err})") from err
    path = Path(source)
    if not path.is_file():
        raise BadImageError(f"{label}: image file not found")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise BadImageError(f"{label}: image too large ({image.width}x{image.height} pixels)")
            check_aspect_ratio(image.width, image.height, label)  # from the header: before decoding
            image.draft("RGB", (1024, 1024))  # JPEG: decode at reduced size when the file is huge
            image.load()
            return to_rgb(image)
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, EOFError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{label}: cannot decode image ({err})") from err


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side symmetrically with `background` (LLaVA's `expand2square`). ImageAspectRatioError for an
    image whose sides are more than `MAX_ASPECT_RATIO` apart: its square canvas would cost up to that many times its
    own pixels (`load_image` refuses such images before decoding them)."""
    width, height = image.size
    if width == height:
        return image
    check_aspect_ratio(width, height)
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_to_square_and_resize(image: Image.Image, size: int, background: tuple[int, int, int]) -> Image.Image:
    """`expand_to_square(image, background).resize((size, size), BICUBIC)` (LLaVA's expand2square, then the CLIP
    resize), without building a huge padded square for a large or thin image.

    Why: a thin image pads to a square of its longer side (a 200 x 10000 image allowed by MAX_ASPECT_RATIO would take
    a 10000 x 10000 RGB canvas, 300 MB, in every DataLoader worker that draws it) only to be resized to `size` pixels.

    What: when the square's side is above MAX_PAD_SIDE and at least 2 * PAD_REDUCING_GAP * size, the square is
    reduced by the integer factor k = side // (PAD_REDUCING_GAP * size) >= 2 (box average of k x k blocks, as PIL's
    `Image.reduce`) without being built: only the blocks that touch the image (the image plus under k pixels of
    padding on each side) are padded and reduced, the rest of the reduced square is the background colour, which is
    what reducing those all-background blocks gives. The reduced square (side >= PAD_REDUCING_GAP * size) is then
    resized with the fractional box that keeps the geometry exact. The result is bit for bit PIL's own
    `expand_to_square(...).resize((size, size), BICUBIC, reducing_gap=PAD_REDUCING_GAP)` (tests check it), i.e. the
    plain path with a box prefilter narrower than 1/PAD_REDUCING_GAP of an output pixel: measured against the plain
    path, at most 1-8 levels of 255 on procedural content (waves, a sharp checkerboard, noise; mean under 0.1
    level), up to 11 on adversarial stripes near the output's Nyquist frequency. For a 200 x 10000 image -> 336:
    peak memory +15 MB instead of +395 MB, 42 ms instead of 1.2 s (2-core CPU; benchmarks/_explore/s11a/pad_cost.py).

    Every other image (square side <= MAX_PAD_SIDE, a square image, which needs no padding, or one too small to reduce
    by 2) takes the plain path, so its output is unchanged. ImageAspectRatioError beyond MAX_ASPECT_RATIO."""
    width, height = image.size
    side = max(width, height)
    factor = side // (PAD_REDUCING_GAP * size)
    if width == height or side <= MAX_PAD_SIDE or factor < 2:
        return expand_to_square(image, background).resize((size, size), Image.Resampling.BICUBIC)
    check_aspect_ratio(width, height)
    x0, y0 = (side - width) // 2, (side - height) // 2  # where expand_to_square puts the image
    # the k-aligned blocks of the square that hold image pixels (the last may be cut by the square's edge: reduce
    # then averages the pixels it has, in the square as here)
    left, top = x0 // factor * factor, y0 // factor * factor
    right = min(-(-(x0 + width) // factor) * factor, side)
    bottom = min(-(-(y0 + height) // factor) * factor, side)
    strip = Image.new(image.mode, (right - left, bottom - top), background)
    strip.paste(image, (x0 - left, y0 - top))
    reduced_side = -(-side // factor)
    square = Image.new(image.mode, (reduced_side, reduced_side), background)
    square.paste(strip.reduce(factor), (left // factor, top // factor))
    del strip
    return square.resize((size, size), Image.Resampling.BICUBIC, box=(0, 0, side / factor, side / factor))


def resize_shortest_side_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre size x size of the image resized (bicubic) so that its shorter side is `size`, with
    `CLIPImageProcessor`'s arithmetic (its PIL backend, which the official checkpoints were trained with): the longer
    side becomes int(size * long / short), the crop starts at (resized - size) // 2. The whole image is resized
    first, as there: resampling only the cropped region (PIL's `box`) moves a few pixels by one level.
    ImageAspectRatioError beyond `MAX_ASPECT_RATIO`, as `expand_to_square` (the resized image would be that thin and
    `size` pixels thick)."""
    width, height = image.size
    check_aspect_ratio(width, height)
    resized_long = int(size * max(width, height) / min(width, height))
    resized_w, resized_h = (size, resized_long) if width <= height else (resized_long, size)
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    left, top = (resized_w - size) // 2, (resized_h - size) // 2
    return image.crop((left, top, left + size, top + size))


IMAGE_MODES = ("pad", "resize", "crop")


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised tensor (3, S, S).

    mode "pad": pad to a square with the mean colour, then resize (keeps the whole image, as LLaVA-1.5/Parrot; a
    square above MAX_PAD_SIDE pixels is built reduced: `pad_to_square_and_resize`);
    mode "resize": stretch to a square;
    mode "crop": CLIP's own preprocessing (`CLIPImageProcessor`: shortest side resized to S, then the centre S x S;
    what the official LLaVA/Parrot code runs for any `image_aspect_ratio` other than "pad").
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "pad"

    def __post_init__(self):
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"image mode {self.mode!r}; use one of {', '.join(map(repr, IMAGE_MODES))}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        if self.mode == "crop":
            image = resize_shortest_side_and_centre_crop(image, self.image_size)
        elif self.mode == "pad":  # mean colour with LLaVA's truncation; large squares built reduced (see there)
            image = pad_to_square_and_resize(image, self.image_size, tuple(int(255 * m) for m in self.mean))
        else:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std
