"""Colour profiles: pixels in the colour space an image's ICC profile names -> sRGB, the space
models are trained in (and the one a file without a profile is taken to be in).

A phone's Display P3 photo fed as stored reaches the model well off its colours (P3 (200, 60, 40)
is sRGB (217, 42, 23): 17 or 18 levels of 255 in every channel); a CMYK JPEG converted by Pillow's
plain inversion ignores what its inks look like. littleCMS (Pillow's ImageCms) does the colour
maths; this module decides when to use it, keeps the transforms it builds, and makes sure that no
profile can fail a request.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

try:
    from PIL import ImageCms
except ImportError:  # a Pillow built without littleCMS (pillow-simd from source without liblcms2)
    ImageCms = None

log = logging.getLogger("cronnx.preprocessing")

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")) if ImageCms is not None else None

# Relative colorimetric: colours that sRGB can show come out exactly as the profile measures
# them, and only those outside sRGB are clipped to its edge. Perceptual would compress the whole
# gamut and so move in-gamut colours too, each vendor's table its own way; the matrix/TRC
# profiles of phones and cameras (Display P3, Adobe RGB) have no perceptual table anyway, so
# littleCMS would use the colorimetric one for them whatever was asked.
INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC if ImageCms is not None else None

# Distinct profiles kept per process. Real traffic carries a handful (sRGB variants, Display P3,
# Adobe RGB, a few press profiles); a transform holds 0.17 MiB (RGB) to 0.48 MiB (CMYK) of
# littleCMS tables, measured: at most 16 MiB per process.
CACHE_SIZE = 32

# A profile that moves no colour by more than this (levels of 255) is sRGB for a model, and the
# pixels are used as stored. The sRGB profiles tried (Pillow's; HP's colorants with a 1024-entry
# curve; a parametric curve) all map exactly onto Pillow's; the level of slack spares a profile
# that rounds differently a conversion that changes nothing a model can see.
SRGB_TOLERANCE = 1


def _probe() -> Image.Image:
    """Colours that show whether a transform changes anything: a grid through the RGB cube (every
    15 levels, both ends included) and every level of each channel and of grey."""
    steps = np.arange(0, 256, 15)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    ramp = np.arange(256)
    zero = np.zeros_like(ramp)
    ramps = [np.stack(channels, axis=1) for channels in
             ((ramp, zero, zero), (zero, ramp, zero), (zero, zero, ramp), (ramp, ramp, ramp))]
    colours = np.concatenate([grid, *ramps]).astype(np.uint8)
    return Image.fromarray(colours[None], "RGB")


PROBE = _probe()


class SrgbTransforms:
    """The transform to sRGB of each profile seen, built once and kept (the least recently used
    dropped past `capacity`); shared by the threads of a process.

    Also remembers the profiles that need none (sRGB itself) and those littleCMS cannot use, so
    that neither costs more than a digest and a look-up after the first time, and a bad profile
    is logged once, not at every image that carries it.
    """

    def __init__(self, capacity: int = CACHE_SIZE):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._transforms: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()

    def get(self, profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
        """The transform from `profile`'s colour space, pixels in Pillow mode `mode` ("RGB",
        "CMYK" or "L"), to sRGB RGB; None where there is nothing to do: the profile is sRGB, or it is
        corrupt, or it does not describe pixels of this mode (logged once)."""
        # A digest, not the bytes, as the key: press profiles run to megabytes.
        key = (hashlib.blake2b(profile, digest_size=16).digest(), mode)
        with self._lock:
            if key in self._transforms:
                self._transforms.move_to_end(key)
                return self._transforms[key]
        # Built outside the lock (a few milliseconds): other threads' images go on meanwhile. Two
        # threads may build the same transform at once; the second is dropped.
        transform, problem = _build(profile, mode)
        with self._lock:
            if key in self._transforms:
                return self._transforms[key]
            self._transforms[key] = transform
            if len(self._transforms) > self.capacity:
                self._transforms.popitem(last=False)
        if problem:
            log.warning("an image's ICC colour profile (%s pixels, digest %s) cannot be used (%s): images that "
                        "carry it are read as sRGB, their pixels as stored", mode, key[0].hex(), problem)
        return transform


def _build(profile: bytes, mode: str) -> tuple[ImageCms.ImageCmsTransform | None, str | None]:
    """(transform, None), or (None, None) for an sRGB profile, or (None, why) for one that
    cannot be used."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        transform = ImageCms.buildTransform(source, SRGB, mode, "RGB", INTENT)
    except (OSError, ValueError, ImageCms.PyCMSError) as exc:
        return None, str(exc) or type(exc).__name__
    if mode == "RGB":
        moved = np.abs(np.asarray(transform.apply(PROBE), np.int16) - np.asarray(PROBE, np.int16))
        if moved.max() <= SRGB_TOLERANCE:
            return None, None
    return transform, None


TRANSFORMS = SrgbTransforms()


_warned_without_littlecms = False


def _warn_without_littlecms() -> None:
    global _warned_without_littlecms
    if not _warned_without_littlecms:
        _warned_without_littlecms = True
        log.warning("this Pillow has no littleCMS (ImageCms): images with a colour profile are used as stored, "
                    "not converted to sRGB; build Pillow with liblcms2")


def to_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    """`image` (mode RGB, CMYK or L), whose pixels are in the colour space `profile` (ICC bytes)
    describes, as RGB in sRGB.

    Returns `image` itself, unchanged, where there is nothing to convert: no profile, an sRGB
    profile, one that is corrupt or that does not fit the image's mode (logged once per profile),
    another mode, or a Pillow without littleCMS (logged once). RGB is converted in place. Never
    raises for a profile.
    """
    if not profile or image.mode not in ("RGB", "CMYK", "L"):
        return image
    if ImageCms is None:
        _warn_without_littlecms()
        return image
    transform = TRANSFORMS.get(profile, image.mode)
    if transform is None:
        return image
    if image.mode == "RGB":
        # In place: a new buffer for a decoded photo costs page faults (see to_rgb).
        return transform.apply_in_place(image)
    return transform.apply(image)
