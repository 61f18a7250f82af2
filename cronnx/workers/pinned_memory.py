"""Page-locked (pinned) host memory for the CUDA EP's copies, made from memory that already exists.

A copy between the host and a GPU runs by DMA only from page-locked memory; from ordinary
(pageable) memory the CUDA driver copies through a page-locked bounce buffer of its own, in
pieces. The worker's inputs and outputs live in the ring's shared segments (and its staging
buffers), which onnxruntime did not allocate and its Python API cannot pin, so they are
page-locked in place with the CUDA runtime's cudaHostRegister (CUDA Runtime API, "Memory
Management"), through the libcudart that onnxruntime's CUDA EP loaded.

Whether this is faster than pageable memory for a model is what the GPU check measures
(`python -m bench.gpu_check`: its cudaHostRegister row, and the served runs with
`--pinned-ring-memory`).
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

# cudaHostRegisterPortable: page-locked for every CUDA context, not only the current one.
_REGISTER_PORTABLE = 1


class CudaHostError(RuntimeError):
    """Host memory cannot be page-locked here; the message says why."""


def loaded_cudart() -> ctypes.CDLL:
    """The CUDA runtime library in this process (the one onnxruntime's CUDA EP loaded with its
    first session, else the one the loader finds), with the signatures used here. Raises
    CudaHostError when there is none."""
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "/libcudart.so" in line})
    names = paths or ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.path = name
        return lib
    raise CudaHostError("no CUDA runtime (libcudart.so) is loaded in this process (the CUDA EP loads it with "
                        "its first session), nor found by the loader (LD_LIBRARY_PATH)")


def page_aligned_zeros(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """Zeros in an anonymous mapping of their own: page-aligned, sharing no page with other
    memory, so that page-locking them never overlaps another registration."""
    nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype, int(np.prod(shape))).reshape(shape)


class PageLocked:
    """Page-locks each array's memory (cudaHostRegister, portable) until `close()`.

    The arrays must be C-contiguous and must not share a page with each other (the ring's
    segments and `page_aligned_zeros` buffers do not). Raises CudaHostError naming the array and
    CUDA's error when one cannot be registered; those registered before it are released first.
    """

    def __init__(self, arrays: dict[str, np.ndarray], cudart: ctypes.CDLL | None = None):
        self._cudart = cudart or loaded_cudart()
        self._addresses: list[int] = []
        try:
            for name, array in arrays.items():
                if not array.flags.c_contiguous:
                    raise CudaHostError(f"cannot page-lock {name}: not one contiguous block")
                code = self._cudart.cudaHostRegister(array.ctypes.data, array.nbytes, _REGISTER_PORTABLE)
                if code != 0:
                    reason = self._cudart.cudaGetErrorString(code).decode()
                    raise CudaHostError(f"cudaHostRegister of {name} ({array.nbytes:,} bytes) failed: "
                                        f"error {code}, {reason} ({self._cudart.path})")
                self._addresses.append(array.ctypes.data)
        except BaseException:
            self.close()
            raise

    @property
    def count(self) -> int:
        """How many regions are page-locked now."""
        return len(self._addresses)

    def close(self) -> None:
        """Unlocks every region (before their memory is unmapped)."""
        while self._addresses:
            self._cudart.cudaHostUnregister(self._addresses.pop())
