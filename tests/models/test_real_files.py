"""Hardening against real files: what they bring that the happy path never sees.

EXIF that Pillow cannot write back or cannot read, probabilities followed by nodes that keep
them probabilities, labels files from any editor, and transparency.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from cronnx.models.catalog import load_labels
from cronnx.config import ConfigError, PreprocessConfig
from cronnx.models.spec import ModelSpec, inspect_model
from cronnx.preprocessing.transform import Preprocessor, to_rgb
from support.client import predict_many
from support.images import encode, exif_block, over_white, photo_like, with_alpha
from support.models import channel_mean_model, classifier_ending_in, image_classifier
from support.reference import DirectModel, assert_matches
from support.server import REPO, model_entry, server_config

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


# --- Probabilities followed by nodes that keep them probabilities ----------------------------

PROBABILITY_TAILS = {
    "identity": ("Softmax", "Identity"),
    "fp16": ("Softmax", "Cast16", "Cast32"),
    "fp16_out": ("Softmax", "Cast16"),
    "reshape": ("Softmax", "Reshape4d"),
    "flatten": ("Softmax", "Reshape4d", "Flatten"),
    "squeeze": ("Softmax", "Unsqueeze", "TransposeOnes", "Squeeze"),
    "dropout": ("Softmax", "Dropout"),
    "exp_logsoftmax": ("LogSoftmax", "Exp", "Identity"),
    "softmax_4d_axis1": ("Unsqueeze", "Softmax@1", "Identity"),
}
LOGIT_TAILS = {
    "mul2": ("Softmax", "Mul2"),
    "log": ("Softmax", "Log"),
    "logsoftmax": ("LogSoftmax", "Identity"),
    "cast_int": ("Softmax", "CastInt", "Cast32"),
    "dropout_training": ("Softmax", "DropoutTraining"),
    "softmax_size1_axis": ("Unsqueeze", "Softmax", "Identity"),     # opset 13: over the last, size-1 axis
    "softmax_half_classes": ("Reshape2xHalf", "Softmax", "Reshape2d"),
}
# Before opset 13 a Softmax normalises everything from its axis (default 1) on, flattened.
OPSET11 = {"softmax_size1_axis": True, "softmax_half_classes": True, "identity": True, "reshape": True}


@pytest.fixture(scope="module")
def tail_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tails")
    return {name: classifier_ending_in(folder / f"{name}.onnx", *steps)
            for name, steps in {**PROBABILITY_TAILS, **LOGIT_TAILS}.items()}


def _raw_outputs(path, batch: int = 4) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(0, 1, (batch, 3, 16, 16)).astype(np.float32)
    return session.run(None, {"input": x})[0].reshape(batch, -1).astype(np.float64)


@pytest.mark.parametrize("name", [*PROBABILITY_TAILS, *LOGIT_TAILS])
def test_probabilities_are_recognised_through_nodes_that_keep_them(tail_models, name):
    spec = inspect_model(str(tail_models[name]))
    assert spec.outputs_probabilities is (name in PROBABILITY_TAILS)
    if name in PROBABILITY_TAILS:
        # The builder's check: onnxruntime's rows are probability vectors.
        rows = _raw_outputs(tail_models[name])
        assert (rows >= 0).all() and np.allclose(rows.sum(axis=1), 1, atol=2e-3)


@pytest.mark.parametrize("name, probabilities", sorted(OPSET11.items()))
def test_softmax_axis_follows_the_opset(tmp_path, name, probabilities):
    steps = {**PROBABILITY_TAILS, **LOGIT_TAILS}[name]
    path = classifier_ending_in(tmp_path / "m.onnx", *steps, opset=11)
    assert inspect_model(str(path)).outputs_probabilities is probabilities
    rows = _raw_outputs(path)
    assert np.allclose(rows.sum(axis=1), 1, atol=1e-5)  # what onnxruntime says: each row sums to 1


def test_served_answers_are_the_models_probabilities_with_no_second_softmax(start_server, tail_models):
    served = ["identity", "fp16", "reshape", "flatten", "mul2", "log"]
    server = start_server(server_config(*[model_entry(n, tail_models[n], top_k=10) for n in served]))
    described = server.models()
    images = [encode(photo_like(w, h, seed=40 + w), "JPEG", quality=90) for w, h in [(120, 90), (90, 120)]]
    for name in served:
        probabilities = name in PROBABILITY_TAILS
        assert described[name]["outputs_probabilities"] is probabilities, name
        direct = DirectModel(tail_models[name], probabilities=probabilities)
        replies = asyncio.run(predict_many(f"{server.url}/predict/{name}", images))
        for image, reply in zip(images, replies):
            assert reply.status == 200, (name, reply.body)
            assert_matches(reply.body, direct.probabilities(image), top_k=10, tolerance=1e-5)
            assert abs(sum(p["confidence"] for p in reply.body["predictions"]) - 1) < 2e-3
    # The reported case, by value: the top class's confidence is onnxruntime's own probability.
    raw = DirectModel(tail_models["identity"], probabilities=True).probabilities(images[0])
    (reply,) = asyncio.run(predict_many(f"{server.url}/predict/identity", images[:1]))
    assert abs(reply.body["predictions"][0]["confidence"] - raw.max()) < 1e-6


@pytest.mark.parametrize("name, words", [("identity", "probabilities (a Softmax over the classes: no second softmax)"),
                                         ("fp16", "probabilities (a Softmax over the classes: no second softmax)"),
                                         ("log", "logits (softmax applied)")])
def test_models_inspect_names_probabilities_through_the_tail(tail_models, name, words):
    result = subprocess.run([sys.executable, "-m", "cronnx", "models", "inspect", str(tail_models[name])],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"output: scores float32 [batch, 10], {words}" in result.stdout.splitlines(), result.stdout


# --- Labels files ----------------------------------------------------------------------------

NAMES = ["tench", "goldfish", "great white shark", "Bügeleisen", "東京", "tiger shark", "hammerhead",
         "electric ray", "stingray", "cock"]


@pytest.mark.parametrize("encoded", [
    ("\ufeff" + "\n".join(NAMES) + "\n").encode(),                          # UTF-8 with a byte-order mark
    ("\ufeff" + "\r\n".join(NAMES) + "\r\n\r\n\r\n").encode(),              # ... CRLF, blank lines at the end
    ("\r".join(NAMES) + "\r").encode(),                                      # classic Mac line endings
    ("\n".join(f"  {n}\t " for n in NAMES) + "\n \n\t\n").encode(),         # spaces, blank-looking lines
    ("\r\n".join(NAMES) + "\r\n").encode("utf-16"),                          # Notepad's "Unicode"
    codecs.BOM_UTF16_BE + ("\n".join(NAMES)).encode("utf-16-be"),
    ("\n".join(NAMES) + "\n").encode("utf-32"),
    ("\ufeff" + "\n".join(NAMES[:5]) + "\n" + "\ufeff" + "\n".join(NAMES[5:])).encode(),  # two files joined
], ids=["bom", "bom-crlf-blank-tail", "cr", "spaces", "utf16le", "utf16be", "utf32", "joined"])
def test_labels_files_from_any_editor_give_the_same_labels(tmp_path, encoded):
    path = tmp_path / "labels.txt"
    path.write_bytes(encoded)
    assert load_labels(str(path), 10, "class_") == NAMES


def test_only_cr_and_lf_end_a_label(tmp_path):
    names = [*NAMES[:9], "form\x0cfeed \u2028 and line separator"]
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(names), encoding="utf-8")
    assert load_labels(str(path), 10, "class_") == names


@pytest.mark.parametrize("encoded, words", [
    ("\n".join(["tench", "goldfish", *"abcdefgh"]).encode("utf-16-le"), "NUL characters"),  # UTF-16, no mark
    ("\n".join(n.replace("東京", "Tokyo") for n in NAMES).encode("latin-1"), "not UTF-8"),  # "ü" as one byte
    (("\ufeff" + "\n".join(NAMES[:9]) + "\n\n\n").encode(), "has 9 labels"),
], ids=["utf16-without-mark", "latin1", "a-label-short"])
def test_labels_files_that_cannot_be_read_right_are_refused(tmp_path, encoded, words):
    path = tmp_path / "labels.txt"
    path.write_bytes(encoded)
    with pytest.raises(ConfigError, match=words):
        load_labels(str(path), 10, "class_")


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
