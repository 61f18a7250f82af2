"""Property-based fuzzing (hypothesis), bounded so that the file runs in seconds.

(a) The image decoding path in this process: on any bytes, arbitrary or a mutated valid JPEG,
    PNG, GIF, WebP, BMP or TIFF, `Preprocessor(...)(data, out)` either fills `out` with finite
    values of the normalisation's range or raises InvalidImage or ImageTooLarge: nothing else,
    no crash, no hang.
(b) The HTTP body parsing of one real server: JSON-ish bodies and arbitrary bytes under a small
    set of content types, encodings and top_k values get exactly the status an independent
    reading of the README predicts, with a JSON {"error": ...} body (or 200 with the direct
    onnxruntime answer), never a 500; the server is healthy afterwards.

Examples are derandomised (the same every run, so that the suite is not flaky); set
CRONNX_FUZZ_RANDOM=1 to explore new ones.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import http.client
import io
import json
import os
import time
from urllib.parse import urlencode, urlparse

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cronnx.config import PreprocessConfig
from cronnx.errors import ImageTooLarge, InvalidImage
from cronnx.models.spec import ModelSpec
from cronnx.preprocessing.transform import Preprocessor, set_max_image_pixels
from support.images import encode, photo_like
from support.metrics import scrape, total, value
from support.reference import DirectModel, assert_matches
from support.server import ServerProcess, model_entry, server_config

PIXEL_LIMIT = 1_000_000
BODY_LIMIT = 64 * 1024
CALL_LIMIT_S = 10.0  # one decode of a small file taking longer is a hang

pytestmark = [
    # The corrupt EXIF and tags of mutated files make Pillow warn; that is not what is tested.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # cronnx.preprocessing.transform turns this warning into an error for the whole process at
    # import, as it is in the server; pytest sets each test's warning filters afresh, so the same
    # is set here.
    pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning"),
]


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    derandomize=not os.environ.get("CRONNX_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def pixel_limit():
    """The server's limit in this process too (Pillow's is process-wide): restored afterwards."""
    before = Image.MAX_IMAGE_PIXELS
    set_max_image_pixels(PIXEL_LIMIT)
    yield
    Image.MAX_IMAGE_PIXELS = before


# --- Seeds: small valid files of every format read -----------------------------------------------

def _animated_gif() -> bytes:
    frames = [photo_like(40, 30, seed=s).convert("P") for s in range(2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0, transparency=0)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    photo = photo_like(40, 30, seed=51)
    rgba = Image.fromarray(np.dstack([np.asarray(photo), np.full((30, 40), 128, np.uint8)]), "RGBA")
    return {
        "jpeg": encode(photo, "JPEG", quality=85),
        "progressive jpeg": encode(photo, "JPEG", quality=85, progressive=True),
        "png": encode(photo, "PNG"),
        "rgba png": encode(rgba, "PNG"),
        "16-bit png": encode(Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257), "PNG"),
        "gif": _animated_gif(),
        "webp": encode(photo, "WEBP", quality=80),
        "lossless webp with alpha": encode(rgba, "WEBP", lossless=True),
        "bmp": encode(photo, "BMP"),
        "tiff": encode(photo, "TIFF"),
        "tiff lzw": encode(photo, "TIFF", compression="tiff_lzw"),
    }


SEEDS = _seeds()
MAGICS = [b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"RIFF\0\0\0\0WEBPVP8 ",
          b"BM", b"II*\0", b"MM\0*"]


@st.composite
def mutated_image(draw) -> bytes:
    """A valid file with 1-4 mutations: a flipped bit, a byte overwritten, bytes inserted or
    deleted, the file cut short. Half of the positions fall in the first 64 bytes (the headers)."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.one_of(st.integers(0, 64), st.integers(0, 1 << 20))) % (len(data) + 1)
        operation = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        if operation == "flip" and position < len(data):
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "overwrite":
            data[position:position + 4] = draw(st.binary(min_size=1, max_size=4))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[position:position + draw(st.integers(1, 16))]
        elif operation == "truncate":
            del data[position:]
    return bytes(data)


# --- (a) The decoding path in this process -------------------------------------------------------

def _spec(height: int, width: int, layout: str = "NCHW", dtype: str = "float32") -> ModelSpec:
    return ModelSpec(input_name="x", layout=layout, input_dtype=dtype, height=height, width=width,
                     fixed_batch=None, output_name="y", output_dtype="float32", output_item_shape=(10,),
                     num_classes=10)


PREPROCESSORS = {
    "crop NCHW float32": (PreprocessConfig(), _spec(32, 32)),
    "stretch NHWC float32 BGR": (PreprocessConfig(resize="stretch", channel_order="BGR"), _spec(24, 40, "NHWC")),
    "crop NCHW float16 portrait": (PreprocessConfig(), _spec(20, 12, dtype="float16")),
}


def _bounds(config: PreprocessConfig) -> tuple[float, float]:
    """The lowest and highest value (pixel * scale - mean) / std can take, over channels."""
    ends = [(p * config.scale - m) / s for p in (0, 255) for m, s in zip(config.mean, config.std)]
    return min(ends), max(ends)


def check_decodes_or_refuses(data: bytes, name: str) -> None:
    config, spec = PREPROCESSORS[name]
    out = np.full(spec.input_item_shape, np.nan, spec.input_dtype)
    started = time.monotonic()
    try:
        Preprocessor(config, spec)(data, out)
    except (InvalidImage, ImageTooLarge) as exc:
        event(type(exc).__name__)
        assert exc.message, "an error without a message"
        return
    except Exception as exc:  # noqa: BLE001 - anything else is the bug this test looks for
        raise AssertionError(f"{type(exc).__name__} escaped the preprocessing: {exc}") from exc
    finally:
        assert time.monotonic() - started < CALL_LIMIT_S, "decoding took too long"
    event("decoded")
    assert out.shape == spec.input_item_shape and out.dtype == np.dtype(spec.input_dtype)
    assert np.isfinite(out).all(), "not every value of the input was written"
    low, high = _bounds(config)
    slack = 0.01 if spec.input_dtype == "float16" else 1e-5
    assert low - slack <= float(out.min()) and float(out.max()) <= high + slack, (out.min(), out.max(), low, high)


@fuzz_settings(60)
@given(data=st.binary(max_size=2048), name=st.sampled_from(sorted(PREPROCESSORS)))
def test_arbitrary_bytes_decode_or_are_refused(data, name):
    check_decodes_or_refuses(data, name)


@fuzz_settings(60)
@given(magic=st.sampled_from(MAGICS), rest=st.binary(max_size=1024), name=st.sampled_from(sorted(PREPROCESSORS)))
def test_bytes_behind_a_format_signature_decode_or_are_refused(magic, rest, name):
    check_decodes_or_refuses(magic + rest, name)


@fuzz_settings(150)
@given(data=mutated_image(), name=st.sampled_from(sorted(PREPROCESSORS)))
def test_mutated_images_decode_or_are_refused(data, name):
    check_decodes_or_refuses(data, name)


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_every_seed_decodes(seed):
    """The mutations start from files that decode: a seed that failed would make them prove little."""
    config, spec = PREPROCESSORS["crop NCHW float32"]
    out = np.full(spec.input_item_shape, np.nan, np.float32)
    Preprocessor(config, spec)(SEEDS[seed], out)
    assert np.isfinite(out).all() and out.std() > 0.1


def test_pillows_warning_range_is_refused_in_this_process_too():
    """Between the limit and twice it Pillow only warns; the preprocessing refuses those too, so
    the in-process oracle below agrees with the server on them."""
    config, spec = PREPROCESSORS["crop NCHW float32"]
    out = np.empty(spec.input_item_shape, np.float32)
    with pytest.raises(ImageTooLarge, match="1,210,000 pixels"):
        Preprocessor(config, spec)(encode(Image.new("L", (1100, 1100)), "PNG"), out)


# --- (b) HTTP body parsing against one real server -----------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """One server for the module, started and cleaned up like `start_server`'s."""
    with ServerProcess.running(tmp_path_factory.mktemp("fuzz-server"), server_config(
        model_entry("tiny", tiny_model), max_body_bytes=BODY_LIMIT, max_image_pixels=PIXEL_LIMIT)) as server:
        yield server


@pytest.fixture(scope="module")
def direct(tiny_model):
    return DirectModel(tiny_model)


RAW_TYPES = {"application/octet-stream", "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/x-png",
             "image/apng", "image/webp", "image/gif", "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff",
             "image/tiff-fx", "image/x-tiff"}
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "Application/JSON", "image/jpeg",
                 "image/png", "IMAGE/PNG", "image/gif", "application/octet-stream", "text/plain", "text/json",
                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "image/svg+xml"]
ENCODINGS = [None] * 5 + ["identity", "gzip", "gzip-but-plain", "compress"]
TOP_KS = [None] * 10 + ["1", "3", "10", "25"] + ["0", "-1", "x", "2.5", ""]
GOOD_IMAGES = [SEEDS["jpeg"], SEEDS["png"], SEEDS["gif"], SEEDS["webp"], SEEDS["tiff"]]
# 1.21 and 9 Mpx against the limit of 1 Mpx (Pillow only warns below twice the limit): 413.
BOMBS = [encode(Image.new("L", (1100, 1100)), "PNG"), encode(Image.new("L", (3000, 3000)), "PNG")]
IMAGES = GOOD_IMAGES + BOMBS


def _base64_of_images() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(IMAGES).map(lambda b: base64.b64encode(b).decode()),
        st.sampled_from(IMAGES).map(lambda b: base64.encodebytes(b).decode()),  # 76-column lines
        mutated_image().map(lambda b: base64.b64encode(b).decode()),
    )


def _base64_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\r -_*", max_size=120),
        st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
        st.integers(BODY_LIMIT - 20, BODY_LIMIT).map(lambda n: "QUJD" * (n // 4)),  # a body around the limit
    )


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))
_json_value = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)


@st.composite
def json_body(draw) -> bytes:
    """A JSON-ish body: an object with or without "image" (base64, or any JSON value) and other
    fields, or any JSON value; now and then cut short or with bytes changed."""
    shape = draw(st.sampled_from(["image", "image", "image", "other fields", "any value"]))
    if shape == "any value":
        value = draw(_json_value)
    else:
        value = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k != "image"), _json_value, max_size=3))
        if shape == "image":
            value["image"] = draw(st.one_of(_base64_of_images(), _base64_of_images(), _base64_text(), _json_value))
    text = json.dumps(value).encode()
    damage = draw(st.sampled_from(["none"] * 8 + ["truncate", "flip"]))
    if damage == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif damage == "flip" and text:
        position = draw(st.integers(0, len(text) - 1))
        text = text[:position] + bytes([text[position] ^ (1 << draw(st.integers(0, 7)))]) + text[position + 1:]
    return text


raw_body = st.one_of(st.binary(max_size=512), st.sampled_from(IMAGES), st.sampled_from(IMAGES), mutated_image(),
                     st.sampled_from(MAGICS).flatmap(lambda m: st.binary(max_size=256).map(lambda b: m + b)),
                     st.integers(BODY_LIMIT - 2, BODY_LIMIT + 2).map(lambda n: b"\xff\xd8" * (n // 2)))


def _json_body_of(image: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode()}).encode()


def expected_answer(body: bytes, sent_size: int, content_type: str | None, encoding: str | None,
                    top_k: str | None) -> tuple[int, bytes | None]:
    """The status the README documents for this request, and the image bytes a 200 answers
    (decoded here with the standard library, and Cronnx's own preprocessing as the reference)."""
    if top_k is not None:
        try:
            if int(top_k) < 1:
                return 400, None
        except ValueError:
            return 400, None
    if encoding == "compress":
        return 415, None
    media_type = (content_type or "").split(";")[0].strip().lower() or "application/octet-stream"
    if media_type != "application/json" and media_type not in RAW_TYPES:
        return 415, None
    if sent_size > BODY_LIMIT:  # its Content-Length says so
        return 413, None
    if encoding == "gzip-but-plain":  # a body its Content-Encoding cannot decode (or an empty one)
        return 400, None
    if len(body) > BODY_LIMIT:  # once decoded
        return 413, None
    if not body:
        return 400, None
    if media_type == "application/json":
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return 400, None
        if not isinstance(request, dict) or not isinstance(request.get("image"), str):
            return 400, None
        encoded = request["image"]
        if "\n" in encoded:  # README: base64 wrapped in lines is read
            encoded = encoded.replace("\r", "").replace("\n", "")
        try:
            image = binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError):
            return 400, None
    else:
        image = body
    config, spec = PREPROCESSORS["crop NCHW float32"]
    try:
        Preprocessor(config, spec)(image, np.empty(spec.input_item_shape, np.float32))
    except InvalidImage:
        return 400, None
    except ImageTooLarge:
        return 413, None
    return 200, image


class Sender:
    """One request per connection with exactly the headers given; counts what it sent."""

    def __init__(self, url: str):
        parts = urlparse(url)
        self.host, self.port = parts.hostname, parts.port
        self.sent = 0
        self.statuses: set[int] = set()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict | str]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request("POST", path, body=body, headers=headers)
            self.sent += 1
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")


def check_answer(sender: Sender, direct: DirectModel, body: bytes, content_type: str | None,
                 encoding: str | None, top_k: str | None) -> None:
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    sent = body
    if encoding == "gzip":
        sent = gzip.compress(body)
    if encoding is not None:
        headers["Content-Encoding"] = "gzip" if encoding == "gzip-but-plain" else encoding
    path = "/predict/tiny" + ("" if top_k is None else "?" + urlencode({"top_k": top_k}))
    expected, image = expected_answer(body, len(sent), content_type, encoding, top_k)
    status, answer = sender.post(path, sent, headers)
    event(f"status {status}")
    assert status != 500, answer
    assert status == expected, (status, answer)
    assert isinstance(answer, dict), answer
    if status == 200:
        assert answer["model"] == "tiny" and answer["version"] == 1
        assert_matches(answer, direct.probabilities(image), top_k=min(int(top_k or 5), 10))
    else:
        assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"], answer
    sender.statuses.add(status)


def check_healthy(server: ServerProcess, direct: DirectModel, sender: Sender, counted_before: float) -> None:
    status, answer = sender.post("/predict/tiny", SEEDS["jpeg"], {"Content-Type": "image/jpeg"})
    assert status == 200, answer
    assert_matches(answer, direct.probabilities(SEEDS["jpeg"]))
    workers = server.models()["tiny"]["workers"]
    assert workers and all(w["slots_in_use"] == 0 and w["live"] and w["restarts"] == 0 for w in workers), workers
    samples = scrape(server.url)
    assert value(samples, "cronnx_in_flight_requests") == 0
    assert total(samples, "cronnx_requests_total") - counted_before == sender.sent
    assert server.proc.poll() is None


def test_json_bodies_get_their_documented_status(server, direct):
    sender = Sender(server.url)
    before = total(scrape(server.url), "cronnx_requests_total")

    json_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "Application/JSON"])

    @fuzz_settings(100)
    @given(body=json_body(), content_type=st.one_of(json_types, st.sampled_from(CONTENT_TYPES)),
           encoding=st.sampled_from(ENCODINGS), top_k=st.sampled_from(TOP_KS))
    # Each outcome at least once, whatever the draw: a bomb (413), a body over the limit (413),
    # base64 in lines of 76 (200), under an encoding that cannot decode it (400).
    @example(body=_json_body_of(BOMBS[0]), content_type="application/json", encoding=None, top_k=None)
    @example(body=_json_body_of(b"\0" * BODY_LIMIT), content_type="application/json", encoding="gzip", top_k="3")
    @example(body=json.dumps({"image": base64.encodebytes(SEEDS["png"]).decode()}).encode(),
             content_type="application/json", encoding=None, top_k="3")
    @example(body=_json_body_of(SEEDS["jpeg"]), content_type="application/json", encoding="gzip-but-plain", top_k=None)
    def prop(body, content_type, encoding, top_k):
        check_answer(sender, direct, body, content_type, encoding, top_k)

    prop()
    # The examples reached every outcome: the oracle was tested on each.
    assert sender.statuses == {200, 400, 413, 415}, sender.statuses
    check_healthy(server, direct, sender, before)


def test_raw_bodies_get_their_documented_status(server, direct):
    sender = Sender(server.url)
    before = total(scrape(server.url), "cronnx_requests_total")

    @fuzz_settings(100)
    @given(body=raw_body, content_type=st.sampled_from(CONTENT_TYPES), encoding=st.sampled_from(ENCODINGS),
           top_k=st.sampled_from(TOP_KS))
    @example(body=BOMBS[1], content_type="image/png", encoding=None, top_k=None)
    @example(body=b"\xff" * (BODY_LIMIT + 1), content_type="image/jpeg", encoding=None, top_k=None)
    @example(body=SEEDS["webp"], content_type=None, encoding="gzip", top_k="25")
    @example(body=SEEDS["gif"], content_type="text/plain", encoding=None, top_k=None)
    def prop(body, content_type, encoding, top_k):
        check_answer(sender, direct, body, content_type, encoding, top_k)

    prop()
    # The examples reached every outcome: the oracle was tested on each.
    assert sender.statuses == {200, 400, 413, 415}, sender.statuses
    check_healthy(server, direct, sender, before)
