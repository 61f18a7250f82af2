"""ICC profiles built byte by byte (ICC.1:2022, version 4.4), for tests that need images tagged
with a colour space other than sRGB: no profile file ships with this environment, and Pillow's
ImageCms creates only sRGB, LAB and XYZ profiles.

Three kinds are enough: an RGB display profile (matrix/TRC: three colorants and three tone
curves, what Display P3 and Adobe RGB are), a grey one (one tone curve) and a CMYK printer profile
(one A2B0 table, CMYK -> Lab).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

# CIE illuminants as XYZ with Y = 1: D50 is the profile connection space's, D65 the displays'.
D50 = np.array([0.9642, 1.0, 0.8249])
D65 = np.array([0.95047, 1.0, 1.08883])
# Bradford cone response matrix (ICC.1, Annex E), for the chromatic adaptation D65 -> D50.
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])

# Primaries' chromaticities (x, y) of red, green and blue; all three spaces have a D65 white.
DISPLAY_P3 = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
ADOBE_RGB = ((0.640, 0.330), (0.210, 0.710), (0.150, 0.060))
SRGB = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))

# parametricCurveType function 3 with the sRGB curve (IEC 61966-2-1): Y = ((X + 0.055) / 1.055)^2.4
# above X = 0.04045, X / 12.92 below. Display P3 uses it too.
SRGB_CURVE = (3, (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
# Adobe RGB (1998): a pure power, 563/256 = 2.19921875 (function 0: Y = X^g).
ADOBE_CURVE = (0, (563 / 256,))


def rgb_to_xyz(primaries=DISPLAY_P3, white=D65) -> np.ndarray:
    """The 3 x 3 matrix from linear RGB (0-1) to XYZ under `white`: each column is one primary,
    scaled so that R = G = B = 1 is the white."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    return xyz * np.linalg.solve(xyz, white)


def adapt_to_d50(white=D65) -> np.ndarray:
    """Bradford's chromatic adaptation matrix from `white` to D50 (XYZ -> XYZ)."""
    cone_from, cone_to = BRADFORD @ white, BRADFORD @ D50
    return np.linalg.inv(BRADFORD) @ np.diag(cone_to / cone_from) @ BRADFORD


def rgb_profile(primaries=DISPLAY_P3, curve=SRGB_CURVE, description: str = "Display P3 (test)") -> bytes:
    """A version 4 RGB display profile (matrix/TRC) for D65-white primaries and one tone curve.

    The colorants are stored adapted to D50 and the adaptation itself in `chad`, as the standard
    asks of a display profile whose white is not D50.
    """
    adapt = adapt_to_d50()
    colorants = adapt @ rgb_to_xyz(primaries)
    trc = _parametric_curve(*curve)
    tags = [(b"desc", _text(description)), (b"cprt", _text("No copyright, use freely")),
            (b"wtpt", _xyz(D50)), (b"chad", _sf32(adapt.reshape(-1))),
            (b"rXYZ", _xyz(colorants[:, 0])), (b"gXYZ", _xyz(colorants[:, 1])), (b"bXYZ", _xyz(colorants[:, 2])),
            (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]
    return _profile(b"mntr", b"RGB ", b"XYZ ", tags)


def grey_profile(gamma: float = 2.2, description: str = "Gray Gamma 2.2 (test)") -> bytes:
    """A version 4 grey display profile: grey levels are `gamma`-encoded luminance, D50 white."""
    tags = [(b"desc", _text(description)), (b"cprt", _text("No copyright, use freely")),
            (b"wtpt", _xyz(D50)), (b"kTRC", _parametric_curve(0, (gamma,)))]
    return _profile(b"mntr", b"GRAY", b"XYZ ", tags)


def cmyk_profile(lab_of: Callable[[np.ndarray], np.ndarray], grid: int = 9,
                 description: str = "CMYK press (test)") -> bytes:
    """A version 4 CMYK output profile whose A2B0 table samples `lab_of` on a grid.

    `lab_of` maps ink amounts (N x 4, 0-1, 0 = no ink: the convention of Pillow's CMYK mode and of
    ICC profiles) to CIE Lab under D50 (N x 3). Only the device -> PCS direction is written: what
    reading a CMYK image needs.
    """
    levels = np.linspace(0.0, 1.0, grid)
    # The first input channel varies slowest in the table (ICC.1, 10.10).
    inks = np.stack(np.meshgrid(levels, levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 4)
    lab = lab_of(inks)
    # lut16Type encodes Lab as ICC version 2 did: L* 0-100 -> 0-0xFF00, a*, b* -128-127.996 -> 0-0xFFFF.
    encoded = np.stack([lab[:, 0] * 0xFF00 / 100, (lab[:, 1] + 128) * 256, (lab[:, 2] + 128) * 256], axis=1)
    table = np.clip(np.round(encoded), 0, 0xFFFF).astype(">u2").tobytes()
    identity = struct.pack(">HH", 0, 0xFFFF)  # two-entry input and output curves: straight lines
    lut = (b"mft2" + bytes(4) + struct.pack(">BBBx", 4, 3, grid) + _sf32(np.eye(3).reshape(-1))[8:]
           + struct.pack(">HH", 2, 2) + identity * 4 + table + identity * 3)
    tags = [(b"desc", _text(description)), (b"cprt", _text("No copyright, use freely")),
            (b"wtpt", _xyz(D50)), (b"A2B0", lut)]
    return _profile(b"prtr", b"CMYK", b"Lab ", tags)


def press_lab(inks: np.ndarray) -> np.ndarray:
    """CIE Lab (D50) of ink amounts (N x 4, 0-1) on a made-up but plausible press, far from
    Pillow's plain CMYK -> RGB (R = 255 - C - K, clipped): dots spread on paper (a 50% dot covers
    about 66%), inks absorb 90% of the light they should, black ink 88%, and the paper reflects 95%.
    """
    c, m, y, k = (inks ** 0.6).T
    linear = np.stack([(1 - 0.9 * c), (1 - 0.9 * m), (1 - 0.9 * y)], axis=1) * ((1 - 0.88 * k) * 0.95)[:, None]
    xyz = linear @ (adapt_to_d50() @ rgb_to_xyz(SRGB)).T / D50

    def f(t):
        return np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)

    fx, fy, fz = f(xyz).T
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=1)


def _profile(device_class: bytes, colour_space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """Header (128 bytes), tag table and the tags' data, each starting on a 4-byte boundary."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        table += struct.pack(">4sII", signature, offset + len(data), len(body))
        data += body + bytes(-len(body) % 4)
    size = offset + len(data)
    header = (struct.pack(">I4sI4s4s4s", size, b"", 0x04400000, device_class, colour_space, pcs)
              + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + bytes(4) + struct.pack(">I", 0)
              + bytes(8) + bytes(8) + struct.pack(">I", 0) + _sf32(D50)[8:] + bytes(4) + bytes(16) + bytes(28))
    assert len(header) == 128
    return header + table + data


def _s15f16(values) -> bytes:
    return b"".join(struct.pack(">i", round(float(v) * 65536)) for v in values)


def _sf32(values) -> bytes:
    """s15Fixed16ArrayType."""
    return b"sf32" + bytes(4) + _s15f16(values)


def _xyz(value) -> bytes:
    return b"XYZ " + bytes(4) + _s15f16(value)


def _parametric_curve(function: int, parameters: tuple[float, ...]) -> bytes:
    return b"para" + bytes(4) + struct.pack(">HH", function, 0) + _s15f16(parameters)


def _text(text: str) -> bytes:
    """multiLocalizedUnicodeType with one record, en-US."""
    utf16 = text.encode("utf-16-be")
    return b"mluc" + bytes(4) + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(utf16), 28) + utf16
