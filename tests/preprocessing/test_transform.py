"""Preprocessing: every image mode and orientation becomes the right RGB tensor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cronnx.config import PreprocessConfig
from cronnx.models.spec import ModelSpec
from cronnx.errors import ImageTooLarge, InvalidImage
from cronnx.preprocessing.transform import Preprocessor, set_max_image_pixels
from support.images import encode, jpeg_with_orientation, photo_like

SIZE = 64


def image_spec(layout: str = "NCHW", dtype: str = "float32", height: int = SIZE, width: int = SIZE) -> ModelSpec:
    return ModelSpec(input_name="x", layout=layout, input_dtype=dtype, height=height, width=width, fixed_batch=None,
                     output_name="y", output_dtype="float32", output_item_shape=(10,), num_classes=10)


def run(image_bytes: bytes, mode: str = "crop", spec: ModelSpec | None = None, **options) -> np.ndarray:
    spec = spec or image_spec()
    out = np.empty(spec.input_item_shape, spec.input_dtype)
    Preprocessor(PreprocessConfig(resize=mode, **options), spec)(image_bytes, out)
    return out


def reference(rgb: Image.Image, mode: str = "crop") -> np.ndarray:
    """Resize-then-centre-crop the plain way, then the usual normalisation."""
    if mode == "stretch":
        rgb = rgb.resize((SIZE, SIZE), Image.BILINEAR)
    else:
        short = SIZE / 0.875
        w, h = rgb.size
        scale = short / min(w, h)
        rgb = rgb.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        w, h = rgb.size
        left, top = (w - SIZE) // 2, (h - SIZE) // 2
        rgb = rgb.crop((left, top, left + SIZE, top + SIZE))
    x = np.asarray(rgb, np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def close(a: np.ndarray, b: np.ndarray, tolerance: float = 0.15) -> bool:
    # Resampling in one step vs two differs by a few levels at edges; mean error stays small.
    return float(np.abs(a - b).mean()) < tolerance


@pytest.mark.parametrize("mode", ["crop", "stretch"])
def test_png_matches_plain_resize_and_normalise(mode):
    photo = photo_like(300, 200, seed=5)
    assert close(run(encode(photo, "PNG"), mode), reference(photo, mode))


def test_normalisation_is_exact_on_a_uniform_image():
    out = run(encode(Image.new("RGB", (100, 100), (255, 0, 128)), "PNG"))
    expected = (np.array([1.0, 0.0, 128 / 255]) - [0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(out.reshape(3, -1).mean(axis=1), expected, atol=1e-5)
    assert np.allclose(out.reshape(3, -1).std(axis=1), 0, atol=1e-5)


def test_large_jpeg_decoded_in_draft_mode_stays_close_to_a_full_decode():
    photo = photo_like(2000, 1500, seed=2)
    assert close(run(encode(photo, "JPEG", quality=95)), reference(photo), tolerance=0.1)


def test_progressive_jpeg_is_read():
    photo = photo_like(400, 300, seed=4)
    assert close(run(encode(photo, "JPEG", quality=95, progressive=True)), reference(photo))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_image_modes_become_rgb(mode):
    photo = photo_like(160, 120, seed=8)
    converted = photo.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    expected = reference(converted.convert("RGB"))
    assert close(run(encode(converted, fmt, **({"quality": 95} if fmt == "JPEG" else {}))), expected)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 128 * 128).reshape(128, 128)).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    out = run(encode(image, "PNG"))
    grey8 = Image.fromarray((ramp >> 8).astype(np.uint8), "L").convert("RGB")
    assert close(out, reference(grey8), tolerance=0.05)
    # Clipping at 255 would make almost every pixel white.
    assert out[0].min() < -1.5


# A camera stores the pixels as the sensor saw them and a tag that says how to turn them
# upright; `inverse` stores the upright photo turned so that applying the tag restores it.
@pytest.mark.parametrize("orientation, inverse", [(3, Image.ROTATE_180), (6, Image.ROTATE_90), (8, Image.ROTATE_270)])
def test_exif_orientation_is_applied(orientation, inverse):
    photo = photo_like(320, 200, seed=6)
    stored = photo.transpose(inverse)
    upright = run(encode(photo, "JPEG", quality=92))
    assert close(run(jpeg_with_orientation(stored, orientation)), upright, tolerance=0.05)
    # Without applying the tag, the result would be far off.
    assert not close(run(encode(stored, "JPEG", quality=92)), upright, tolerance=0.05)


def test_first_frame_of_an_animated_gif_is_used():
    frames = [Image.new("RGB", (80, 80), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = run(data)
    assert out[0].mean() > 1.5 and out[2].mean() < -1.0


@pytest.mark.parametrize("data", [b"", b"GIF89a garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_unreadable_bytes_raise_image_error(data):
    with pytest.raises(InvalidImage):
        run(data)


def test_decompression_bomb_is_refused():
    set_max_image_pixels(1_000_000)
    try:
        with pytest.raises(ImageTooLarge):
            run(encode(Image.new("L", (2000, 2000)), "PNG"))
    finally:
        set_max_image_pixels(50_000_000)


def test_formats_outside_the_accepted_list_are_refused():
    # PPM is a real image format Pillow reads, but not one a client of this server may send.
    with pytest.raises(InvalidImage, match="format"):
        run(encode(photo_like(40, 30, seed=1), "PPM"))


def test_layouts_dtypes_and_channel_orders_hold_the_same_pixels():
    data = encode(photo_like(200, 150, seed=12), "PNG")
    nchw = run(data)
    assert np.array_equal(run(data, spec=image_spec("NHWC")), nchw.transpose(1, 2, 0))
    assert np.allclose(run(data, spec=image_spec(dtype="float16")).astype(np.float32), nchw, atol=2e-3)
    pixels = run(data, spec=image_spec(dtype="uint8"))
    assert pixels.dtype == np.uint8
    # uint8 gets the raw pixels: normalising them gives the float32 input.
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    assert np.allclose((pixels / 255.0 - mean) / std, nchw, atol=1e-5)
    bgr = run(data, channel_order="BGR", mean=[0.406, 0.456, 0.485], std=[0.225, 0.224, 0.229])
    assert np.allclose(bgr, nchw[::-1], atol=1e-6)
    unscaled = run(data, scale=1.0, mean=[0, 0, 0], std=[1, 1, 1])
    assert np.array_equal(unscaled, pixels.astype(np.float32))


def test_non_square_non_224_input_size():
    out = run(encode(photo_like(400, 300, seed=13), "JPEG"), spec=image_spec(height=96, width=128))
    assert out.shape == (3, 96, 128) and np.isfinite(out).all()
