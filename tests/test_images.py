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
    # rows 0-1 and 6-7 are padding in the mean colour as LLaVA's process_images makes it, tuple(int(x * 255) for x
    # in image_mean) -> normalised to (int(255 m)/255 - m)/s, about 0
    pad_value = (torch.tensor([int(255 * m) / 255 for m in MEAN]) - torch.tensor(MEAN)) / torch.tensor(STD)
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


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG: 32768 is mid grey (128), 100 * 257 is 100 -- Pillow's convert("RGB") made both white."""
    levels = np.array([[32768, 100 * 257], [0, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (2, 2, 3)
    assert pixels[..., 0].tolist() == [[128, 100], [0, 255]] and (pixels == pixels[..., :1]).all()


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored landscape with EXIF orientation 6 ("rotate 90 clockwise to display") loads as displayed."""
    stored = Image.new("RGB", (40, 20), (200, 10, 10))
    stored.paste((10, 10, 200), (0, 0, 10, 20))  # blue band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    top_row = np.asarray(image)[2, 10]
    assert top_row[2] > 150 and top_row[0] < 100  # the left band is now at the top
    assert ImageTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(Image.open(path)).shape == (3, 16, 16)
