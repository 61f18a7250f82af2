"""Both sides' bookkeeping of the rings a filling child (a preprocessing or front process) maps:
`MappedRings` is the owner's record of what a child maps, `AttachedRings` the child's mappings."""

from __future__ import annotations

import numpy as np

from cronnx.ipc.ring import AttachedRing, SlotRing
from cronnx.preprocessing.messages import Fill, Setup
from cronnx.preprocessing.transform import Preprocessor


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
