""""pad" mode builds a large padded square reduced (`pad_to_square_and_resize`): images whose square is at most
MAX_PAD_SIDE pixels are transformed exactly as before (LLaVA's expand2square, then the bicubic resize), a huge thin
image gives PIL's own reducing_gap path bit for bit and stays close to the plain path, without its canvas."""

import numpy as np
import pytest
import torch
from PIL import Image

from parrot.data import images
from parrot.data.images import (MAX_PAD_SIDE, PAD_REDUCING_GAP, ImageTransform, expand_to_square,
                                pad_to_square_and_resize, to_rgb)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
BACKGROUND = tuple(int(255 * m) for m in MEAN)


def procedural(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth waves, a sharp checkerboard and noise, one per channel."""
    yy, xx = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    return Image.fromarray(np.stack([(128 + 127 * np.sin(xx / 3.0 + yy / 17.0)).astype(np.uint8),
                                     ((xx // 5 + yy // 7) % 2 * 255).astype(np.uint8),
                                     np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)],
                                    -1))


def plain_pad(image: Image.Image, size: int) -> torch.Tensor:
    """The "pad" transform without the reduction (as it was): pad to the full square, resize, normalise."""
    square = expand_to_square(to_rgb(image), BACKGROUND).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("width, height, size", [
    (640, 480, 336), (480, 640, 24), (37, 1000, 336), (2, 3, 8), (24, 24, 24),
    (82, MAX_PAD_SIDE, 24),  # thin, but the square is exactly at the bound
    (MAX_PAD_SIDE, 100, 336),
    (150, 4500, 600),  # above the bound, but 4500 < 2 * PAD_REDUCING_GAP * 600: no reduction by 2 possible
    (4200, 4200, 32),  # square: nothing to pad
])
def test_images_under_the_bound_are_bit_identical(width, height, size):
    image = procedural(width, height, seed=width + height)
    assert torch.equal(ImageTransform(size, MEAN, STD, "pad")(image), plain_pad(image, size))


@pytest.mark.parametrize("width, height, size", [(150, 6000, 336), (6000, 150, 32), (1001, 5003, 224)])
def test_huge_thin_image_is_reduced_before_padding(width, height, size, monkeypatch):
    image = procedural(width, height)
    side = max(width, height)
    factor = side // (PAD_REDUCING_GAP * size)
    assert side > MAX_PAD_SIDE and factor >= 2

    # exactly PIL's own reduce-then-resize on the materialised square (reducing_gap gives the same factor)
    square = expand_to_square(image, BACKGROUND)
    reference = square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=PAD_REDUCING_GAP)
    allocated = []
    new = Image.new

    def recording_new(mode, canvas_size, *args, **kwargs):
        allocated.append(canvas_size[0] * canvas_size[1])
        return new(mode, canvas_size, *args, **kwargs)

    monkeypatch.setattr(images.Image, "new", recording_new)
    out = pad_to_square_and_resize(image, size, BACKGROUND)
    monkeypatch.undo()
    assert np.array_equal(np.asarray(out), np.asarray(reference))
    # no canvas of the full square: the largest is the image's strip or the reduced square
    assert max(allocated) <= max((width + 2 * factor) * height, width * (height + 2 * factor),
                                 (-(-side // factor)) ** 2)

    # close to the plain path: the reduction is a box prefilter narrower than 1/PAD_REDUCING_GAP of an output pixel.
    # Measured on these images 1-2 levels of 255 at most (mean under 0.07), on other procedural ones up to 8, on
    # adversarial stripes near the output's Nyquist frequency up to 11 (benchmarks/_explore/s11a/pad_worst.py):
    # hence 12; the mean difference stays below 0.1 level.
    out = ImageTransform(size, MEAN, STD, "pad")(image)
    levels = ((out - plain_pad(image, size)) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
    assert levels.max() <= 12 and levels.mean() <= 0.25, (levels.max(), levels.mean())
    assert not torch.equal(out, plain_pad(image, size))  # the reduced path was taken


def test_reduced_path_still_refuses_too_thin_images():
    with pytest.raises(images.ImageAspectRatioError, match="100x5100 pixels"):
        pad_to_square_and_resize(Image.new("RGB", (100, 5100)), 32, BACKGROUND)
