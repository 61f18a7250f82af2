"""Both sides' bookkeeping of the rings a filling child (a preprocessing or front process) maps:
`MappedRings` is the owner's record of what a child maps, `ClosedRingSweeper` tells children to
let go of the closed ones, `AttachedRings` is the child's mappings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from cronnx.ipc.ring import AttachedRing, SlotRing
from cronnx.preprocessing.messages import Fill, Forget, Setup
from cronnx.preprocessing.transform import Preprocessor

if TYPE_CHECKING:
    from cronnx.ipc.child import ChildProcess

# How often filling children are told to unmap the rings of versions that have gone.
FORGET_INTERVAL_S = 1.0


class MappedRings:
    """The owner's record of the rings one child process maps, by input segment name."""

    def __init__(self) -> None:
        self._rings: dict[str, SlotRing] = {}

    def setup_for(self, ring: SlotRing, preprocessor: Preprocessor) -> Setup | None:
        """The Setup to send with a Fill of `ring`: None when the child maps it already."""
        name = ring.layout.input_segment
        if name in self._rings:
            return None
        self._rings[name] = ring
        return Setup(ring.layout, preprocessor.config, preprocessor.spec)

    def closed(self) -> list[str]:
        """The rings closed since the last call (a replaced or unloaded version's), forgotten here:
        send each a Forget, since an unlinked segment's memory is freed only once no process maps it."""
        names = [name for name, ring in self._rings.items() if ring.closed]
        for name in names:
            del self._rings[name]
        return names


class ClosedRingSweeper:
    """Every FORGET_INTERVAL_S seconds, tells each filling child to unmap the rings closed since
    the last sweep (`Forget`): an unlinked segment's memory, which counts against /dev/shm, is
    freed only once no process maps it. `children()` gives each live child's record of what it
    maps and its process; a busy child reads its Forget after its current fill. Create it on the
    running event loop; `cancel()` ends the sweeps."""

    def __init__(self, children: Callable[[], Iterable[tuple[MappedRings, ChildProcess]]]):
        self._children = children
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(FORGET_INTERVAL_S, self._sweep)

    def _sweep(self) -> None:
        for rings, process in self._children():
            for name in rings.closed():
                try:
                    process.send(Forget(name))
                except OSError:
                    pass  # it died: its mappings went with it
        self._timer = self._loop.call_later(FORGET_INTERVAL_S, self._sweep)

    def cancel(self) -> None:
        self._timer.cancel()


class AttachedRings:
    """A child's mappings of the rings it fills, each with its model's preprocessing."""

    def __init__(self) -> None:
        self._rings: dict[str, tuple[AttachedRing, Preprocessor]] = {}

    def target(self, fill: Fill) -> tuple[np.ndarray, Preprocessor]:
        """The input memory of the fill's slot and the preprocessing that fills it (the ring is
        attached on its first fill, which carries its Setup)."""
        if fill.ring not in self._rings:
            setup = fill.setup
            self._rings[fill.ring] = (AttachedRing(setup.ring), Preprocessor(setup.preprocess, setup.spec))
        ring, preprocessor = self._rings[fill.ring]
        return ring.inputs[fill.slot], preprocessor

    def forget(self, name: str) -> None:
        attached = self._rings.pop(name, None)
        if attached is not None:
            attached[0].close()

    def close(self) -> None:
        for ring, _ in self._rings.values():
            ring.close()
        self._rings.clear()
