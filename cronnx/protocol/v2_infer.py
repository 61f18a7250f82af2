"""An Open Inference Protocol infer request once checked (`v2_inputs.py`), for HTTP (`http/v2.py`)
and gRPC (`grpc/infer.py`) alike: every row run on the chosen version, each in a ring slot of its
own (so its rows share batches with every other request of the model), and the answer's output
tensors made from the rows' outputs. Each protocol encodes the tensors its own way."""

from __future__ import annotations

import asyncio
import struct
import time

import msgspec
import numpy as np

from cronnx.engine.client import InferenceClient, InferenceResult, ModelView, QueueParameters, Selection
from cronnx.models.postprocess import check_finite, top_k
from cronnx.protocol.record import RequestRecord
from cronnx.protocol.v2_inputs import DATATYPES, OutputPlan


class OutputTensor(msgspec.Struct):
    """One output of the answer: `tensor` ([N, *output item], the model's output dtype) for the
    model's output, or `strings` (N x k "score:index:label" of the classification extension,
    row-major) for a BYTES output; `shape` and `datatype` as the protocol names them; `binary`
    whether the request asked for it as binary data (HTTP's binary data extension)."""

    name: str
    datatype: str
    shape: list[int]
    binary: bool
    tensor: np.ndarray | None = None
    strings: list[str] | None = None

    def raw(self) -> bytes:
        """The tensor's bytes as the binary data extension and gRPC's `raw_output_contents` carry
        them: row-major values, or BYTES elements each after its 4-byte little-endian length."""
        if self.strings is not None:
            return serialize_bytes([s.encode() for s in self.strings])
        return np.ascontiguousarray(self.tensor).tobytes()


def serialize_bytes(elements: list[bytes]) -> bytes:
    """Triton's BYTES serialisation: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


async def run_rows(client: InferenceClient, selection: Selection, rows, record: RequestRecord, deadline: float,
                   queue: QueueParameters) -> list[InferenceResult]:
    """Every row of `rows` (a tensor [N, ...] or N encoded images) run on the chosen version, in
    order; the record's batch size and batches filled in. Raises the first failing row's error,
    the other rows cancelled."""
    jobs = [client.infer(selection, row, record.request_id, deadline, queue, record.trace) for row in rows]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(job) for job in jobs]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    results = [task.result() for task in tasks]
    record.batch_size = max(r.batch_size for r in results)
    record.batches = list(dict.fromkeys(r.batch_trace for r in results if r.batch_trace is not None))
    return results


def output_tensors(model: ModelView, outputs: list[OutputPlan], results: list[InferenceResult]) -> list[OutputTensor]:
    """The answer's outputs, one per plan, from each row's result in order. Raises InferenceFailed
    when the model's output holds a non-finite value (as /predict: a 500, not nulls in a 200)."""
    tensors = []
    for output in outputs:
        if output.classes is not None:
            labels = model.labels
            rows = [[f"{score}:{index}:{labels[index]}"
                     for index, score in top_k(r.output, output.classes, model.outputs_probabilities)]
                    for r in results]
            tensors.append(OutputTensor(output.name, "BYTES", [len(rows), len(rows[0])], output.binary,
                                        strings=[s for row in rows for s in row]))
        else:
            tensor = np.stack([r.output for r in results])
            check_finite(tensor)
            tensors.append(OutputTensor(output.name, DATATYPES[model.spec.output_dtype], list(tensor.shape),
                                        output.binary, tensor=tensor))
    return tensors


def record_phases(record: RequestRecord, read_s: float, results: list[InferenceResult], respond_started: float) -> None:
    """An answered request's phases in seconds: `read_s` its read and checks, the slowest row's
    admission, preprocess, queue and inference, and its answer's encoding from `respond_started`
    (perf_counter) to now."""
    record.phases = {"read": read_s, "admission": max(r.admission_s for r in results),
                     "preprocess": max(r.preprocess_s for r in results),
                     "queue": max(r.queue_s for r in results), "inference": max(r.infer_s for r in results),
                     "respond": time.perf_counter() - respond_started}
