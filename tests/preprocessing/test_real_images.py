"""Real images: what they bring that the happy path never sees. EXIF that Pillow cannot write
back or cannot read (the orientation applied all the same), and transparency composited over
white; then both, with a labels file from an editor, served over HTTP."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from cronnx.config import PreprocessConfig
from cronnx.models.spec import ModelSpec
from cronnx.preprocessing.transform import Preprocessor, to_rgb
from support.client import predict_many
from support.images import encode, exif_block, over_white, photo_like, with_alpha
from support.models import LABEL_NAMES as NAMES, channel_mean_model, image_classifier
from support.server import model_entry, server_config

SIZE = 32
ORIENTATION, X_RESOLUTION, Y_RESOLUTION, RESOLUTION_UNIT = 0x0112, 0x011A, 0x011B, 0x0128
SHORT, LONG, RATIONAL, ASCII, UNDEFINED, SRATIONAL, FLOAT = 3, 4, 5, 2, 7, 10, 11


def image_spec(height: int = SIZE, width: int = SIZE) -> ModelSpec:
    return ModelSpec(input_name="x", layout="NCHW", input_dtype="float32", height=height, width=width,
                     fixed_batch=None, output_name="y", output_dtype="float32", output_item_shape=(10,),
                     num_classes=10)


def run(data: bytes, spec: ModelSpec | None = None, **options) -> np.ndarray:
    spec = spec or image_spec()
    out = np.empty(spec.input_item_shape, np.float32)
    Preprocessor(PreprocessConfig(**options), spec)(data, out)
    return out


def decoded(data: bytes) -> Image.Image:
    """The stored pixels as Pillow decodes them, EXIF ignored."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def upright(stored: Image.Image, orientation: int) -> Image.Image:
    """Pillow's own exif_transpose, given an EXIF holding nothing but the orientation: the
    reference for what each of the 8 orientations means."""
    image = Image.fromarray(np.asarray(stored))  # a new image: none of the file's EXIF comes along
    image.getexif()[ORIENTATION] = orientation
    return ImageOps.exif_transpose(image)


def camera_exif(orientation: int, big_endian: bool = False) -> bytes:
    """The reported phone EXIF: an orientation, and resolutions a phone wrote as a signed rational
    -1/0 and a rational 0/0, which Pillow reads but cannot write back (struct.error)."""
    return exif_block([(ORIENTATION, SHORT, [orientation]), (X_RESOLUTION, SRATIONAL, [(-1, 0)]),
                       (Y_RESOLUTION, RATIONAL, [(0, 0)]), (RESOLUTION_UNIT, SHORT, [2])], big_endian)


STORED = photo_like(64, 48, seed=31)  # a 64x48 JPEG, as reported

# Pillow warns (UserWarning) of the corrupt EXIF these tests are made of.
corrupt_exif = pytest.mark.filterwarnings("ignore::UserWarning")


# --- EXIF ------------------------------------------------------------------------------------

@pytest.mark.parametrize("big_endian", [False, True], ids=["intel", "motorola"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_whatever_else_the_exif_holds(orientation, big_endian):
    data = encode(STORED, "JPEG", quality=92, exif=camera_exif(orientation, big_endian))
    expected = run(encode(upright(decoded(data), orientation), "PNG"))
    assert np.array_equal(run(data), expected)
    if orientation != 1:  # the reference itself is turned or flipped: ignoring the tag cannot pass
        assert not np.allclose(run(encode(decoded(data), "PNG")), expected, atol=0.1)


@corrupt_exif
@pytest.mark.parametrize("entry, applied", [
    ((ORIENTATION, SHORT, [0]), 1),
    ((ORIENTATION, SHORT, [9]), 1),
    ((ORIENTATION, SHORT, [65535]), 1),
    ((ORIENTATION, LONG, [8]), 8),                 # LONG instead of SHORT: the same number
    ((ORIENTATION, FLOAT, [6.0]), 6),
    ((ORIENTATION, SRATIONAL, [(6, 1)]), 6),
    ((ORIENTATION, RATIONAL, [(0, 0)]), 1),        # NaN
    ((ORIENTATION, SRATIONAL, [(13, 2)]), 1),      # 6.5
    ((ORIENTATION, ASCII, b"6\0"), 1),             # text is not a number
    ((ORIENTATION, UNDEFINED, b"\x06"), 1),
    ((ORIENTATION, SHORT, [6, 3]), 6),             # a count of 2: the first value
    ((ORIENTATION, SHORT, [6], 0x7FFFFFFF), 1),    # a count that runs past the file: tag skipped
    ((ORIENTATION, 99, b"\x06\x00"), 1),            # a type that does not exist
], ids=["0", "9", "65535", "long-8", "float-6.0", "srational-6/1", "rational-0/0", "srational-13/2", "ascii-6",
        "undefined-6", "count-2", "count-past-the-file", "type-99"])
def test_odd_orientation_tags_turn_the_picture_only_by_a_valid_orientation(entry, applied):
    data = encode(STORED, "JPEG", quality=92, exif=exif_block([entry, (X_RESOLUTION, SRATIONAL, [(-1, 0)])]))
    assert np.array_equal(run(data), run(encode(upright(decoded(data), applied), "PNG")))


def _png_with_text(image: Image.Image, key: str, value: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return encode(image, "PNG", pnginfo=info)


@corrupt_exif
@pytest.mark.parametrize("data", [
    encode(STORED, "JPEG", quality=92, exif=b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 8),
    encode(STORED, "JPEG", quality=92, exif=camera_exif(6)[:17]),                      # cut in its table
    encode(STORED, "JPEG", quality=92, exif=b"Exif\x00\x00II*\x00\xff\xff\x00\x00"),  # IFD past the end
    # ImageMagick's hex EXIF in a PNG text chunk, not hex at all: Pillow's getexif raises on it.
    _png_with_text(STORED, "Raw profile type exif", "\nexif\n      12\nnot hex at all!\n"),
], ids=["garbage", "truncated", "ifd-past-the-end", "png-raw-profile-not-hex"])
def test_exif_that_cannot_be_parsed_leaves_the_picture_as_stored(data):
    assert np.array_equal(run(data), run(encode(decoded(data), "PNG")))


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_orientation_in_png_and_webp_exif_is_applied_too(fmt, options):
    data = encode(STORED, fmt, exif=camera_exif(6), **options)
    turned = STORED.transpose(Image.Transpose.ROTATE_270)  # 6: turn 90 degrees clockwise
    assert np.array_equal(run(data), run(encode(turned, "PNG")))


def test_jpeg_draft_of_a_turned_picture_keeps_enough_pixels_for_a_stretched_model():
    """A portrait model (32 x 256) and a landscape photo stored as portrait with orientation 6:
    libjpeg's draft must keep the stored width (the upright height) at 256 or more."""
    rows = (np.arange(512) // 4 % 2 * 255).astype(np.uint8)  # stripes 4 rows high, upright
    upright_photo = Image.fromarray(np.repeat(rows[:, None], 4096, axis=1), "L").convert("RGB")
    stored = upright_photo.transpose(Image.Transpose.ROTATE_90)  # 512 wide x 4096 high
    data = encode(stored, "JPEG", quality=95, exif=camera_exif(6))
    spec = image_spec(height=256, width=32)
    reference = run(encode(decoded(data).transpose(Image.Transpose.ROTATE_270), "PNG"), spec, resize="stretch")
    served = run(data, spec, resize="stretch")
    # An eighth-size draft (64 rows upright, stretched to 256) averages the stripes to a flat grey
    # (std 0); a draft that keeps 256 rows or more keeps them (the full decode's std is 1.6).
    assert reference[0].std() > 1.0
    assert served[0].std() > reference[0].std() / 2


# --- Transparency ----------------------------------------------------------------------------

def _alpha_ramp(height: int, width: int) -> np.ndarray:
    """Every alpha from fully transparent to opaque, half-transparent in the middle."""
    return np.linspace(0, 255, height * width).round().astype(np.uint8).reshape(height, width)


def _rgb_of(data: bytes) -> np.ndarray:
    return np.asarray(Preprocessor(PreprocessConfig(), image_spec()).load_rgb(data))


def test_half_transparent_rgba_png_is_composited_over_white():
    colours = np.asarray(photo_like(48, 40, seed=32))
    alpha = _alpha_ramp(40, 48)
    data = encode(with_alpha(colours, alpha), "PNG")
    expected = over_white(colours, alpha)
    assert np.array_equal(_rgb_of(data), expected)
    assert np.array_equal(run(data), run(encode(Image.fromarray(expected, "RGB"), "PNG")))
    # Dropping the alpha instead would give the colours themselves: far from white where clear.
    assert np.abs(expected.astype(int) - colours).max() > 200


def test_la_image_is_composited_over_white():
    grey = np.asarray(photo_like(48, 40, seed=33).convert("L"))
    alpha = np.full((40, 48), 128, np.uint8)
    data = encode(Image.merge("LA", (Image.fromarray(grey, "L"), Image.fromarray(alpha, "L"))), "PNG")
    expected = np.repeat(over_white(grey, alpha)[..., None], 3, axis=2)
    assert np.array_equal(_rgb_of(data), expected)
    assert np.array_equal(run(data), run(encode(Image.fromarray(expected, "RGB"), "PNG")))


def test_transparent_colour_keys_are_composited_over_white():
    """GIF's transparent index, PNG's tRNS colour in L, RGB and 16-bit images: transparent pixels
    are white, the others keep their colour."""
    keyed = np.zeros((40, 48), bool)
    keyed[10:30, 5:20] = True
    grey = np.where(keyed, 0, 90).astype(np.uint8)
    palette_image = Image.fromarray(grey, "L").convert("P")
    index = palette_image.getpixel((5, 10))
    rgb = np.dstack([grey, grey, grey + 50])
    grey16 = np.where(keyed, 1000, 90 * 257).astype(np.uint16)
    files = [encode(palette_image, "GIF", transparency=index),
             encode(Image.fromarray(grey, "L"), "PNG", transparency=0),
             encode(Image.fromarray(rgb, "RGB"), "PNG", transparency=(0, 0, 50)),
             encode(Image.fromarray(grey16), "PNG", transparency=1000)]
    for data in files:
        out = _rgb_of(data).astype(int)
        assert (out[keyed] == 255).all(), data[:4]
        assert np.abs(out[~keyed] - rgb[~keyed]).max() <= 1 or (out[~keyed] == 90).all(), data[:4]


def test_webp_alpha_and_premultiplied_alpha_are_composited_over_white():
    colours = np.asarray(photo_like(48, 40, seed=34))
    alpha = _alpha_ramp(40, 48)
    expected = over_white(colours, alpha)
    webp = encode(with_alpha(colours, alpha), "WEBP", lossless=True, exact=True)
    assert np.array_equal(_rgb_of(webp), expected)
    # RGBa (premultiplied, from TIFF's associated alpha) loses a level or two in premultiplying.
    premultiplied = to_rgb(with_alpha(colours, alpha).convert("RGBa"))
    assert np.abs(np.asarray(premultiplied).astype(int) - expected).max() <= 2


# --- Over HTTP: EXIF, labels and transparency in one server ----------------------------------

def test_served_odd_exif_bom_labels_and_transparency(start_server, tmp_path):
    photo_model = image_classifier(tmp_path / "photo.onnx", size=SIZE)
    means_model = channel_mean_model(tmp_path / "means.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_bytes(("\ufeff" + "\r\n".join(NAMES) + "\r\n\r\n").encode())
    identity = {"resize": "stretch", "scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}
    server = start_server(server_config(
        model_entry("photo", photo_model, labels=str(labels), top_k=10),
        model_entry("means", means_model, outputs="probabilities", top_k=3, preprocess=identity)))

    # The reported JPEG: 200, and the answer of the same pixels turned by hand.
    odd = encode(STORED, "JPEG", quality=92, exif=camera_exif(6))
    by_hand = encode(decoded(odd).transpose(Image.Transpose.ROTATE_270), "PNG")
    unturned = encode(decoded(odd), "PNG")
    replies = asyncio.run(predict_many(f"{server.url}/predict/photo", [odd, by_hand, unturned], "image/jpeg"))
    assert [r.status for r in replies] == [200, 200, 200], replies
    served, expected, wrong = (r.body["predictions"] for r in replies)
    assert [p["class_id"] for p in served] == [p["class_id"] for p in expected]
    assert all(abs(a["confidence"] - b["confidence"]) < 1e-6 for a, b in zip(served, expected))
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(
        sorted(served, key=lambda p: p["class_id"]), sorted(wrong, key=lambda p: p["class_id"]))) > 1e-4
    # Labels from a BOM + CRLF file: class 0 is "tench", no mark in front.
    assert {p["class_id"]: p["label"] for p in served} == dict(enumerate(NAMES))

    # A solid colour, a quarter opaque, over white; the model answers each channel's mean.
    rgba = encode(Image.new("RGBA", (20, 10), (200, 40, 0, 64)), "PNG")
    la = encode(Image.new("LA", (20, 10), (100, 128)), "PNG")
    rgba_reply, la_reply = asyncio.run(predict_many(f"{server.url}/predict/means", [rgba, la], "image/png"))
    assert rgba_reply.status == 200 and la_reply.status == 200, (rgba_reply, la_reply)
    # 200 * 64/255 + 255 * 191/255 = 241.2; 40 * 64/255 + 191 = 201.0; 0 + 191 = 191.
    assert [(p["class_id"], p["confidence"]) for p in rgba_reply.body["predictions"]] == [(0, 241), (1, 201), (2, 191)]
    # 100 * 128/255 + 255 * 127/255 = 177.2 in every channel.
    assert [p["confidence"] for p in la_reply.body["predictions"]] == [177, 177, 177]
