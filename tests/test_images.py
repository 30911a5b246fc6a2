"""Image loading and the CLIP transform."""

import numpy as np
import pytest
import torch
from PIL import Image

from parrot.data.images import BadImageError, ImageTransform, expand_to_square, load_image

MEAN, STD = (0.5, 0.25, 0.125), (0.5, 0.5, 0.5)


def test_pad_mode_pads_with_mean_colour_then_normalises():
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    out = ImageTransform(8, MEAN, STD, "pad")(image)
    assert out.shape == (3, 8, 8)
    # rows 0-1 and 6-7 are padding in the mean colour -> normalised to (round(255 m)/255 - m)/s, about 0
    pad_value = (torch.tensor([round(255 * m) / 255 for m in MEAN]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, 0, 0], pad_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 4, 4], (torch.tensor([1.0, 0, 0]) - torch.tensor(MEAN)) / torch.tensor(STD))


def test_resize_mode_stretches():
    image = Image.new("RGB", (8, 4), (0, 255, 0))
    out = ImageTransform(8, MEAN, STD, "resize")(image)
    expected = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, 0, 0], expected)


def test_expand_to_square_centres_the_image():
    image = Image.fromarray(np.full((2, 6, 3), 200, dtype=np.uint8))
    square = np.asarray(expand_to_square(image, (1, 2, 3)))
    assert square.shape == (6, 6, 3)
    assert (square[2:4] == 200).all() and (square[:2] == (1, 2, 3)).all() and (square[4:] == (1, 2, 3)).all()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="image mode"):
        ImageTransform(8, MEAN, STD, "crop")


def test_bad_images_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(BadImageError, match="corrupt.png"):
        load_image(corrupt)
    with pytest.raises(BadImageError, match="missing.jpg.*not found"):
        load_image(tmp_path / "missing.jpg")
    good = tmp_path / "good.png"
    Image.new("L", (3, 3), 7).save(good)
    assert load_image(good).mode == "RGB"
