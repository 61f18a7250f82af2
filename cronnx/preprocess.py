"""Image bytes -> normalised CHW float32, written straight into the destination (a ring slot).

Runs in the front's thread pool: Pillow's decode and resize and numpy's arithmetic release
the GIL, so several requests are preprocessed on several cores at once.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import PIL

from .config import PreprocessConfig
from .errors import ImageTooLarge, InvalidImage
from .model_spec import ModelSpec

# Pillow warns between MAX_IMAGE_PIXELS and twice that; a server refuses instead.
warnings.simplefilter("error", Image.DecompressionBombWarning)


# Formats a client may send. Pillow can open more (EPS, for one, runs Ghostscript), which a
# server that reads untrusted bodies should not offer. (JPEG covers multi-picture MPO files.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def pil_build() -> str:
    """Which PIL is installed: pillow-simd reports a version with a '.postN' suffix."""
    version = PIL.__version__
    kind = "pillow-simd" if ".post" in version else "Pillow"
    return f"{kind} {version}"


def set_max_image_pixels(pixels: int) -> None:
    Image.MAX_IMAGE_PIXELS = pixels


class Preprocessor:
    """Preprocessing for one model: its input size, layout and dtype, resize mode and normalisation."""

    def __init__(self, config: PreprocessConfig, spec: ModelSpec):
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
                image.draft("RGB", self._draft_size(image.size))
            image.load()
            image = ImageOps.exif_transpose(image, in_place=False) if _has_rotation(image) else image
            return to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"image too large: {exc}") from None
        except UnidentifiedImageError:
            raise InvalidImage(f"body is not an image in a format the server reads ({', '.join(ACCEPTED_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidImage(f"cannot decode image: {exc}") from None

    def _draft_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The smallest size draft may reduce to while the resize still has enough pixels."""
        w, h = size
        if self.mode == "stretch":
            return self.width, self.height
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


def _has_rotation(image: Image.Image) -> bool:
    return image.getexif().get(0x0112, 1) not in (1, None)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; convert only when needed (converting RGB copies the whole image)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG, TIFF): Pillow's conversion to L clips at 255 instead of scaling.
        pixels = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip(pixels >> 8, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")
