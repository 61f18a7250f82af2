"""Colour profiles: an image whose ICC profile names another colour space than sRGB reaches the
model in sRGB; untagged and sRGB-tagged images reach it exactly as they did before profiles were
read; a profile that cannot be used never fails a request. Real tagged files throughout, their
profiles built byte by byte (support/icc.py); the expected pixels come from littleCMS through
ImageCms in the test, and the profiles themselves are checked against the standards' maths."""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageCms

from cronnx.config import PreprocessConfig
from cronnx.models.spec import ModelSpec
from cronnx.preprocessing.colour import SrgbTransforms
from cronnx.preprocessing.transform import Preprocessor, to_rgb
from support import icc
from support.client import predict_many
from support.images import encode, over_white, photo_like, with_alpha
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config

# Large enough that libjpeg's draft leaves these small test images whole: the expected pixels
# can then be read with a plain decode (the draft has a test of its own).
SIZE = 128
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
P3 = icc.rgb_profile(icc.DISPLAY_P3, icc.SRGB_CURVE, "Display P3 (test)")
ADOBE_RGB = icc.rgb_profile(icc.ADOBE_RGB, icc.ADOBE_CURVE, "Adobe RGB (1998) (test)")
PRESS = icc.cmyk_profile(icc.press_lab)
# sRGB as a camera or an editor writes it: the same space in other bytes (colorants rounded to
# the file's fixed point, the curve as a parametric function), not Pillow's built-in profile.
SRGB_AS_WRITTEN = icc.rgb_profile(icc.SRGB, icc.SRGB_CURVE, "sRGB IEC61966-2.1")


def pixel_spec(height: int = SIZE, width: int = SIZE) -> ModelSpec:
    """A model fed raw uint8 pixels (NHWC): the tensor shows the levels themselves."""
    return ModelSpec(input_name="x", layout="NHWC", input_dtype="uint8", height=height, width=width,
                     fixed_batch=None, output_name="y", output_dtype="float32", output_item_shape=(10,),
                     num_classes=10)


def run(data: bytes, spec: ModelSpec | None = None) -> np.ndarray:
    """The model input Cronnx makes of `data`, H x W x 3 uint8."""
    spec = spec or pixel_spec()
    out = np.empty(spec.input_item_shape, np.uint8)
    Preprocessor(PreprocessConfig(), spec)(data, out)
    return out


def in_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    """`image`'s pixels converted by littleCMS from `profile` to sRGB, relative colorimetric, as
    a new image that carries no profile."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    converted = ImageCms.profileToProfile(image, source, SRGB, ImageCms.Intent.RELATIVE_COLORIMETRIC, "RGB")
    return Image.fromarray(np.asarray(converted), "RGB")


def as_stored(data: bytes) -> np.ndarray:
    """The model input of `data`'s pixels as stored, no profile applied: a PNG of the decoded
    pixels, which carries none."""
    return run(encode(Image.fromarray(np.asarray(to_rgb(Image.open(io.BytesIO(data))))), "PNG"))


def srgb_by_the_standards(pixel, primaries, decode) -> np.ndarray:
    """One pixel's sRGB levels computed from the colour spaces' definitions: decode to linear
    light, through XYZ to linear sRGB (both whites D65), clip, encode with the sRGB curve."""
    linear = np.linalg.inv(icc.rgb_to_xyz(icc.SRGB)) @ icc.rgb_to_xyz(primaries) @ decode(np.asarray(pixel) / 255)
    v = np.clip(linear, 0, 1)
    return 255 * np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)


def srgb_decode(v):
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def adobe_decode(v):
    return v ** (563 / 256)


# --- Other RGB spaces become sRGB ---------------------------------------------------------------

@pytest.mark.parametrize("profile, primaries, decode, fmt", [
    (P3, icc.DISPLAY_P3, srgb_decode, "PNG"),
    (P3, icc.DISPLAY_P3, srgb_decode, "JPEG"),
    (ADOBE_RGB, icc.ADOBE_RGB, adobe_decode, "PNG"),
], ids=["display-p3-png", "display-p3-jpeg", "adobe-rgb-png"])
def test_a_flat_colour_in_another_space_reaches_the_model_in_srgb(profile, primaries, decode, fmt):
    data = encode(Image.new("RGB", (48, 40), (200, 60, 40)), fmt, icc_profile=profile)
    stored = Image.open(io.BytesIO(data)).convert("RGB")  # JPEG may round a level away
    expected = np.asarray(in_srgb(stored, profile).getpixel((0, 0)))
    served = run(data)
    assert np.abs(served.reshape(-1, 3).astype(int) - expected).max() <= 1
    # The profiles are the spaces they claim: littleCMS agrees with the definitions within a level.
    assert np.abs(expected - srgb_by_the_standards(stored.getpixel((0, 0)), primaries, decode)).max() <= 1
    # ... and the colour moves far: fed as stored it would be 17 levels off or more in some channel.
    assert np.abs(served.reshape(-1, 3).astype(int) - (200, 60, 40)).max() >= 17


def test_display_p3_200_60_40_is_srgb_217_42_23():
    """The reported pixel, in numbers: Display P3 (200, 60, 40) is sRGB (217, 42, 23), by littleCMS
    and by the matrix maths alike (17, 18 and 17 levels away from the stored values)."""
    served = run(encode(Image.new("RGB", (8, 8), (200, 60, 40)), "PNG", icc_profile=P3))
    assert served.reshape(-1, 3).tolist() == [[217, 42, 23]] * (SIZE * SIZE)
    assert np.round(srgb_by_the_standards((200, 60, 40), icc.DISPLAY_P3, srgb_decode)).tolist() == [217, 42, 23]


def test_a_display_p3_photo_is_converted_before_the_resize():
    """Converting first, then resizing, is what the model sees: the exact tensor of the converted
    pixels (converting after the resize differs by up to 25 levels at saturated edges)."""
    photo = photo_like(300, 200, seed=41)
    assert np.array_equal(run(encode(photo, "PNG", icc_profile=P3)), run(encode(in_srgb(photo, P3), "PNG")))


def test_jpeg_draft_mode_still_applies_and_the_drafted_pixels_are_converted():
    photo = photo_like(2000, 1500, seed=42)
    untagged, tagged = encode(photo, "JPEG", quality=92), encode(photo, "JPEG", quality=92, icc_profile=P3)
    preprocessor = Preprocessor(PreprocessConfig(), pixel_spec())
    drafted = preprocessor.load_rgb(untagged)  # the same compressed pixels, decoded the same way
    assert drafted.size == (250, 188)  # libjpeg decoded at an eighth
    assert preprocessor.load_rgb(tagged).size == drafted.size
    assert np.array_equal(run(tagged), run(encode(in_srgb(drafted, P3), "PNG")))


def test_transparency_is_composited_over_white_then_converted():
    """A screenshot from a Mac: RGBA, Display P3. White, where it is see-through, stays white."""
    colours = np.asarray(photo_like(40, 32, seed=43))
    alpha = np.tile(np.linspace(0, 255, 40).round().astype(np.uint8), (32, 1))
    data = encode(with_alpha(colours, alpha), "PNG", icc_profile=P3)
    expected = run(encode(in_srgb(Image.fromarray(over_white(colours, alpha)), P3), "PNG"))
    assert np.array_equal(run(data), expected)
    pixels = np.asarray(Preprocessor(PreprocessConfig(), pixel_spec()).load_rgb(data))
    assert (pixels[:, 0] == 255).all()  # the fully transparent column


# --- CMYK with a profile ------------------------------------------------------------------------

def test_a_cmyk_jpeg_is_converted_from_its_inks_by_its_profile():
    inks = photo_like(160, 120, seed=44).convert("CMYK")
    data = encode(inks, "JPEG", quality=95, icc_profile=PRESS)
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == "CMYK" and stored.info["icc_profile"] == PRESS
    served = run(data)
    assert np.array_equal(served, run(encode(in_srgb(stored, PRESS), "PNG")))
    # Pillow's plain CMYK -> RGB (what an untagged CMYK JPEG still gets) is far from the press.
    plain = run(encode(inks, "JPEG", quality=95)).astype(int)
    assert np.abs(served.astype(int) - plain).mean() > 20


def test_a_grey_jpeg_is_converted_by_its_tone_curve():
    """Grey levels stored with a gamma of 2.2 (Photoshop's "Gray Gamma 2.2"), not sRGB's curve:
    the same luminance is up to 8.5 levels lower in sRGB among the darks (16 -> 7.5), as littleCMS
    and the maths agree (within 1.5 levels: littleCMS rounds its grey path)."""
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (64, 1)), "L")
    data = encode(ramp, "JPEG", quality=100, icc_profile=icc.grey_profile(2.2))
    stored = Image.open(io.BytesIO(data))
    assert stored.mode == "L"
    converted = np.asarray(in_srgb(stored, icc.grey_profile(2.2)))
    served = np.asarray(Preprocessor(PreprocessConfig(), pixel_spec()).load_rgb(data))
    assert np.array_equal(served, converted)
    linear = (np.asarray(stored, np.float64) / 255) ** 2.2
    by_the_maths = 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    assert np.abs(converted[..., 0] - by_the_maths).max() <= 1.5
    assert np.abs(served[..., 0].astype(int) - np.asarray(stored)).max() >= 5


# --- sRGB and untagged: the pixels as stored, at no cost ----------------------------------------

@pytest.mark.parametrize("profile", [None, SRGB.tobytes(), SRGB_AS_WRITTEN],
                         ids=["untagged", "pillow-srgb", "srgb-as-written"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_untagged_and_srgb_images_reach_the_model_as_stored(profile, fmt):
    options = {"icc_profile": profile} if profile else {}
    data = encode(photo_like(300, 200, seed=45), fmt, **options)
    assert np.array_equal(run(data), as_stored(data))


def test_an_srgb_profile_costs_a_look_up_not_a_transform():
    transforms = SrgbTransforms()
    assert transforms.get(SRGB_AS_WRITTEN, "RGB") is None
    assert transforms.get(bytes(bytearray(SRGB_AS_WRITTEN)), "RGB") is None  # found again by its bytes


# --- Profiles that cannot be used ---------------------------------------------------------------

def _unusable_profiles(tag: bytes) -> dict[str, bytes]:
    """Each distinct from every other test's (a profile is logged once per process)."""
    return {
        "truncated": P3[:200] + tag,
        "garbage": b"not an ICC profile " + tag,
        "header-only": P3[:128] + tag,
        "cmyk-profile-on-rgb-pixels": icc.cmyk_profile(icc.press_lab, description=tag.decode()),
    }


@pytest.mark.parametrize("kind", list(_unusable_profiles(b"x")))
def test_an_unusable_profile_leaves_the_pixels_as_stored_and_is_logged_once(kind, caplog):
    profile = _unusable_profiles(f"unusable {kind}".encode())[kind]
    data = encode(photo_like(120, 90, seed=46), "PNG", icc_profile=profile)
    with caplog.at_level(logging.WARNING, logger="cronnx.preprocessing"):
        first, second = run(data), run(data)
    assert np.array_equal(first, as_stored(data)) and np.array_equal(second, first)
    lines = [r for r in caplog.records if "ICC colour profile" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "cannot be used" in lines[0].getMessage()


# --- The transforms' cache ----------------------------------------------------------------------

def test_transforms_are_kept_per_profile_and_the_least_recently_used_is_dropped():
    transforms = SrgbTransforms(capacity=2)
    p3, adobe = transforms.get(P3, "RGB"), transforms.get(ADOBE_RGB, "RGB")
    assert p3 is not None and adobe is not None
    assert transforms.get(P3, "RGB") is p3  # kept, and now the most recently used
    transforms.get(PRESS, "CMYK")  # a third profile: Adobe RGB goes
    assert transforms.get(P3, "RGB") is p3
    assert transforms.get(ADOBE_RGB, "RGB") is not adobe


def test_threads_sharing_the_transforms_get_what_one_thread_gets():
    """Preprocessing runs in a pool of threads; the transforms are built and used by all at once
    (profiles no other test uses, so that the threads also build them)."""
    profiles = [icc.rgb_profile(icc.DISPLAY_P3, icc.SRGB_CURVE, "P3 threads"),
                icc.rgb_profile(icc.ADOBE_RGB, icc.ADOBE_CURVE, "Adobe RGB threads"),
                icc.rgb_profile(icc.SRGB, icc.SRGB_CURVE, "sRGB threads")]
    photos = [photo_like(200, 150, seed=s) for s in range(12)]
    files = [encode(p, "JPEG", quality=90, icc_profile=profiles[i % 3]) for i, p in enumerate(photos)]
    files += [encode(photos[0].convert("CMYK"), "JPEG", quality=90,
                     icc_profile=icc.cmyk_profile(icc.press_lab, description="press threads"))]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, files * 4))
    alone = [run(data) for data in files]
    assert all(np.array_equal(t, alone[i % len(files)]) for i, t in enumerate(together))
    assert not np.array_equal(alone[0], as_stored(files[0]))  # converted, not left as stored


# --- Over HTTP ----------------------------------------------------------------------------------

def test_served_display_p3_photo_equals_onnxruntime_on_the_srgb_pixels(start_server, demo_model, photos):
    server = start_server(server_config(model_entry("mobilenetv2", demo_model, labels=None, demo=True)))
    direct = DirectModel(demo_model)
    pixels = Image.open(photos[2]).convert("RGB")
    tagged, untagged = encode(pixels, "JPEG", quality=92, icc_profile=P3), encode(pixels, "JPEG", quality=92)
    converted = encode(in_srgb(direct.preprocess.load_rgb(untagged), P3), "PNG")
    reply, = asyncio.run(predict_many(f"{server.url}/predict/mobilenetv2", [tagged], "image/jpeg"))
    assert reply.status == 200, reply
    assert_matches(reply.body, direct.probabilities(converted))
    # Negative control: the same pixels read as sRGB get another answer.
    as_stored_probs, converted_probs = direct.probabilities(untagged), direct.probabilities(converted)
    assert np.abs(as_stored_probs - converted_probs).max() > 1e-4
