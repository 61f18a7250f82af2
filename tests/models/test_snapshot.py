"""A version's bytes are read once and kept: what the file holds later does not reach them."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil

import pytest

from cronnx.config import ModelConfig
from cronnx.models import catalog, snapshot
from cronnx.models.catalog import ModelVersion
from support.models import image_classifier


def test_kept_bytes_outlive_an_overwrite_and_have_no_name(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"first bytes")
    kept = snapshot.keep(str(path))
    path.write_bytes(b"other bytes")
    with open(kept.path, "rb") as f:
        assert f.read() == b"first bytes"
    assert kept.digest == hashlib.sha256(b"first bytes").hexdigest()
    assert os.stat(kept.path).st_nlink == 0  # no name anywhere: nothing else can change it


def test_bytes_already_kept_are_not_copied_again_and_go_with_their_last_holder(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the same bytes")
    first = snapshot.keep(str(path))
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(path, copy)
    assert snapshot.keep(str(copy)) is first
    fd = int(first.path.rsplit("/", 1)[1])
    del first
    gc.collect()
    with pytest.raises(OSError):  # closed: the kernel frees the copy
        os.fstat(fd)
    assert snapshot.keep(str(path)).digest == hashlib.sha256(b"the same bytes").hexdigest()


def test_the_fingerprint_changes_with_the_bytes_when_size_and_time_do_not(tmp_path):
    path = image_classifier(tmp_path / "model.onnx", seed=1)
    version = ModelVersion("m", 1, str(path), ModelConfig(name="m", path=str(path)), "test")
    before = catalog.prepare(version)
    stat = os.stat(path)
    shutil.copyfile(image_classifier(tmp_path / "other.onnx", seed=2), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    after = catalog.prepare(version)
    assert after.fingerprint != before.fingerprint
    assert catalog.prepare(version).fingerprint == after.fingerprint  # unchanged bytes: the same version


def test_a_model_with_external_data_is_loaded_by_its_own_path_and_still_prepared(tmp_path):
    import onnx

    source = image_classifier(tmp_path / "source.onnx")
    model = onnx.load(str(source))
    path = tmp_path / "external" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (path.parent / "weights.bin").stat().st_size > 0
    kept = snapshot.keep(str(path))
    # Not copied: onnxruntime finds weights.bin beside the model's own path only.
    assert not kept.kept and kept.path == str(path)
    prepared = catalog.prepare(ModelVersion("ext", 1, str(path), ModelConfig(name="ext", path=str(path)), "test"))
    assert prepared.spec.num_classes == 10 and prepared.file.path == str(path)
    assert snapshot.keep(str(source)).kept  # a self-contained model is copied
    # Its version is what its files hold: new weights, a new digest (a reload replaces it).
    weights = path.parent / "weights.bin"
    weights.write_bytes(weights.read_bytes()[::-1])
    os.utime(weights, ns=(1, 1))
    assert snapshot.keep(str(path)).digest != kept.digest
