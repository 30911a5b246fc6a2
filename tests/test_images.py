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


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (37, 1000), (1000, 37), (335, 336), (2, 3),
                                           (24, 24)])
@pytest.mark.parametrize("size", [24, 33])
def test_crop_mode_equals_the_clip_image_processor(width, height, size):
    """"crop" is what the official code runs for image_aspect_ratio other than "pad": transformers'
    CLIPImageProcessor (its PIL backend: shortest side to `size`, bicubic, centre crop), to the pixel level."""
    from transformers.models.clip import CLIPImageProcessorPil

    image = Image.fromarray(np.random.default_rng(width * height + size).integers(0, 256, (height, width, 3),
                                                                                   dtype=np.uint8))
    reference = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_mean=MEAN, image_std=STD)(image, return_tensors="pt")["pixel_values"][0]
    out = ImageTransform(size, MEAN, STD, "crop")(image)
    assert out.shape == (3, size, size)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)  # float32 normalisation order only


def test_crop_mode_keeps_the_centre():
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    image.paste((255, 0, 0), (10, 0, 20, 10))  # a red middle third: the centre square of a 3:1 image
    out = ImageTransform(10, MEAN, STD, "crop")(image)
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, 5, 2:8], red[:, None].expand(3, 6), atol=0.05, rtol=0)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="image mode"):
        ImageTransform(8, MEAN, STD, "centre")


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


def test_a_float_tiff_is_refused_by_name_not_turned_black(tmp_path):
    """Pillow's convert("RGB") clips 32-bit float pixels to 0..255, so a 0..1 float TIFF loaded all black."""
    path = tmp_path / "float.tif"
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), mode="F").save(path)
    assert Image.open(path).mode == "F"
    with pytest.raises(BadImageError, match=r"float\.tif: .*32-bit float pixels \(mode F\)"):
        load_image(path)
    with pytest.raises(BadImageError, match=r"array: .*mode F"):
        load_image(Image.open(path), name="array")


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


def _transparent_images():
    """Black line art on a transparent background, stored as transparent black (what drawing tools save), in every
    way Pillow represents transparency: an alpha band (RGBA, LA), palette alpha (P), a transparent colour (L, RGB)
    and partial alpha."""
    rng = np.random.default_rng(0)
    alpha = np.zeros((6, 8), dtype=np.uint8)
    alpha[2:4] = 255
    alpha[5, :4] = 100  # partly transparent
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    rgb[alpha == 0] = 0
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    yield "RGBA", rgba, {}
    yield "LA", rgba.convert("LA"), {}
    palette = Image.new("P", (8, 6), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 2, 8, 4))
    yield "P", palette, {"transparency": 0}
    grey = Image.fromarray(np.where(alpha == 0, 0, 200).astype(np.uint8), "L")
    yield "L", grey, {"transparency": 0}
    yield "RGB", grey.convert("RGB"), {"transparency": (0, 0, 0)}


def test_transparency_is_laid_on_white_as_clip_image_processors_do(tmp_path):
    """Reference: transformers' `convert_to_rgb` (what CLIP's image processors and the demo's uploads do): a plain
    convert("RGB") showed the model the black hidden under the alpha, so the line art vanished into black."""
    from transformers.image_transforms import convert_to_rgb

    for mode, image, save_args in _transparent_images():
        path = tmp_path / f"{mode}.png"
        image.save(path, **save_args)
        expected = convert_to_rgb(Image.open(path), return_numpy=True)
        assert (expected == 255).all(axis=-1).any(), mode  # the reference really shows white somewhere
        assert np.array_equal(np.asarray(load_image(path)), expected), mode
        assert np.array_equal(np.asarray(load_image(Image.open(path))), expected), mode
        out = ImageTransform(8, MEAN, STD, "resize")(Image.open(path))
        ref = ImageTransform(8, MEAN, STD, "resize")(Image.fromarray(expected))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_sixteen_bit_grey_with_a_transparent_level(tmp_path):
    levels = np.array([[0, 65535], [32768, 0]], dtype=np.uint16)
    path = tmp_path / "grey16_trns.png"
    Image.fromarray(levels).save(path, transparency=0)
    assert Image.open(path).mode.startswith("I") and Image.open(path).info.get("transparency") == 0
    assert np.asarray(load_image(path))[..., 0].tolist() == [[255, 255], [128, 255]]  # level 0 is see-through


def test_animated_files_give_their_first_frame_and_are_closed(tmp_path):
    import gc
    import warnings

    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    for suffix in ("gif", "webp"):
        path = tmp_path / f"anim.{suffix}"
        extra = {"lossless": True} if suffix == "webp" else {}
        frames[0].save(path, save_all=True, append_images=frames[1:], **extra)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pixel = np.asarray(load_image(path))[4, 4]
            gc.collect()
        assert pixel.tolist() == [255, 0, 0], suffix
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], suffix  # no file left open
