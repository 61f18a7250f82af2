"""Image bytes -> the model's input for one item (its layout, NCHW or NHWC, and its dtype: float32
or float16 normalised, or uint8 pixels), written straight into the destination (a ring slot).

Runs in a pool of threads (the server process's, or a front process's) or in a preprocessing
process: Pillow's decode and resize and numpy's arithmetic release the GIL, so several requests
are preprocessed on several cores at once.
"""

from __future__ import annotations

import io
import math
import numbers
import re
import warnings

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from cronnx.config import PreprocessConfig
from cronnx.errors import ImageTooLarge, InvalidImage
from cronnx.models.spec import ModelSpec
from cronnx.preprocessing.colour import to_srgb

# Pillow warns between MAX_IMAGE_PIXELS and twice that; a server refuses instead.
warnings.simplefilter("error", Image.DecompressionBombWarning)


# Formats a client may send. Pillow can open more (EPS, for one, runs Ghostscript), which a
# server that reads untrusted bodies should not offer. (JPEG covers multi-picture MPO files.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Where a picture is see-through, a person sees what is behind it: the page (white, in the usual
# viewer), not the colour an encoder happened to leave in its transparent pixels (often black,
# sometimes leftovers of an edit). Transparency is composited over this colour.
BACKGROUND = (255, 255, 255)
# Modes that carry an alpha band ("a": premultiplied); other modes may carry a transparent
# colour key in info["transparency"] (P, and PNG's tRNS for 1, L, I;16 and RGB).
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# EXIF Orientation -> the transpose that turns the stored pixels upright (EXIF 2.3, tag 0x0112).
ORIENTATION_TAG = 0x0112
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def pil_build() -> str:
    """Which PIL is installed: pillow-simd reports a version with a '.postN' suffix."""
    version = PIL.__version__
    kind = "pillow-simd" if ".post" in version else "Pillow"
    return f"{kind} {version}"


def set_max_image_pixels(pixels: int) -> None:
    Image.MAX_IMAGE_PIXELS = pixels


def _too_large(pillow_message: str) -> str:
    """The client is told the configured limit: Pillow's own message names twice the limit for
    images above that (its DecompressionBombError threshold)."""
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    size = f" ({int(found.group(1)):,} pixels)" if found else ""
    return f"image too large{size}: the limit is {Image.MAX_IMAGE_PIXELS:,} pixels (server.max_image_pixels)"


class Preprocessor:
    """Preprocessing for one model: its input size, layout and dtype, resize mode and normalisation."""

    def __init__(self, config: PreprocessConfig, spec: ModelSpec):
        # Kept so that a preprocessing process can build the same Preprocessor.
        self.config, self.spec = config, spec
        self.mode = config.resize
        self.height, self.width = spec.height, spec.width
        self.short_side = max(self.height, self.width) / config.crop_ratio
        self.channels_first = spec.layout == "NCHW"
        self.bgr = config.channel_order == "BGR"
        self.raw_pixels = spec.input_dtype == "uint8"
        self.cast_from_float32 = spec.input_dtype == "float16"
        shape = (3, 1, 1) if self.channels_first else (3,)
        # mean and std are given in the model's channel order.
        mean = np.asarray(config.mean, np.float32)
        std = np.asarray(config.std, np.float32)
        # (x * scale - mean) / std == x * a + b: one multiply and one add in place.
        self.a = (config.scale / std).astype(np.float32).reshape(shape)
        self.b = (-mean / std).astype(np.float32).reshape(shape)

    def __call__(self, data: bytes, out: np.ndarray) -> None:
        """Decode `data` and write the model input for one item into `out` (its layout and dtype)."""
        pixels = np.asarray(self.resize(self.load_rgb(data)))  # H x W x 3, uint8
        if self.bgr:
            pixels = pixels[..., ::-1]
        if self.channels_first:
            pixels = pixels.transpose(2, 0, 1)
        if self.raw_pixels:
            out[...] = pixels
        elif self.cast_from_float32:
            out[...] = pixels * self.a + self.b
        else:
            np.multiply(pixels, self.a, out=out)
            out += self.b

    def load_rgb(self, data: bytes) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            if image.format == "JPEG":
                # libjpeg scales by 1/2, 1/4 or 1/8 while decoding: far cheaper than resizing later.
                # The EXIF is read at open, so the draft can aim at the upright picture's size.
                turned = exif_orientation(image) in (5, 6, 7, 8)
                image.draft("RGB", self._draft_size(image.size, turned))
            image.load()
            # Read before converting: the conversion makes a new image without the file's EXIF.
            orientation = exif_orientation(image)
            profile = image.info.get("icc_profile")
            if image.mode in ("CMYK", "L"):
                # By the profile, before Pillow's own conversion: its CMYK -> RGB is a plain
                # inversion, its L -> RGB copies the levels whatever tone curve they were stored in.
                image = to_rgb(to_srgb(image, profile))
            else:
                # After compositing: white, the background, is white in every RGB space.
                image = to_srgb(to_rgb(image), profile)
            return image.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else image
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(_too_large(str(exc))) from None
        except UnidentifiedImageError:
            raise InvalidImage(f"body is not an image in a format the server reads "
                               f"({', '.join(ACCEPTED_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidImage(f"cannot decode image: {exc}") from None

    def _draft_size(self, size: tuple[int, int], turned: bool = False) -> tuple[int, int]:
        """The smallest size draft may reduce to while the resize still has enough pixels.

        `size` is the stored picture's; `turned`: its orientation swaps width and height, so the
        model's width is reached along the stored height (crop mode scales both sides alike).
        """
        w, h = size
        if self.mode == "stretch":
            return (self.height, self.width) if turned else (self.width, self.height)
        scale = self.short_side / min(w, h)
        return math.ceil(w * scale), math.ceil(h * scale)

    def resize(self, image: Image.Image) -> Image.Image:
        if self.mode == "stretch":
            return image.resize((self.width, self.height), Image.BILINEAR)
        w, h = image.size
        # Resize-then-centre-crop as one resize of the source region that becomes the crop.
        scale = self.short_side / min(w, h)
        crop_w, crop_h = self.width / scale, self.height / scale
        left, top = (w - crop_w) / 2, (h - crop_h) / 2
        return image.resize((self.width, self.height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))


def exif_orientation(image: Image.Image) -> int:
    """The picture's EXIF orientation, 1 (as stored) unless it holds a valid one (1-8).

    The orientation is all a classifier needs from EXIF, and EXIF is whatever a phone, camera or
    editor wrote: odd tag types (a signed rational -1/0), wrong counts, values outside 1-8, blocks
    that do not parse. Pillow's own exif_transpose also rewrites the remaining EXIF and raises on
    tags it cannot write back, so only this tag is read, and anything unexpected means "as stored":
    a picture must never fail because of its metadata.
    """
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises many types; none may fail the request
        return 1
    if isinstance(value, tuple) and value:  # a count above 1: the first value is the orientation
        value = value[0]
    # SHORT by the standard; LONG, FLOAT or RATIONAL (6/1) hold the same number. Not text or bytes.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return 1
    try:
        whole = int(value)
    except (ValueError, OverflowError, ZeroDivisionError):  # NaN, infinity, x/0
        return 1
    return whole if whole == value and 1 <= whole <= 8 else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, transparency composited over BACKGROUND; converts only when needed
    (converting RGB copies the whole image)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG, TIFF): Pillow's conversion to L clips at 255 instead of scaling, and
        # its conversion to RGBA ignores a 16-bit transparent colour key: both done here.
        pixels = np.asarray(image, dtype=np.int64)
        grey = Image.fromarray(np.clip(pixels >> 8, 0, 255).astype(np.uint8), "L")
        key = image.info.get("transparency")
        if isinstance(key, int):
            alpha = Image.fromarray(np.where(pixels == key, 0, 255).astype(np.uint8), "L")
            grey = Image.merge("LA", (grey, alpha))
        image = grey
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        # Straight (not premultiplied) RGBA with any colour key applied as alpha, then
        # out = colour * alpha + BACKGROUND * (1 - alpha), rounded (Pillow's paste with a mask).
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba)
        return out
    return image.convert("RGB")
