"""An error crosses a pipe one way: its class and message there, the same error back; a bug (any
other exception, or a name this side does not know) comes back as an InternalError (a 500)."""

from __future__ import annotations

import msgspec
import pytest

from cronnx import errors
from cronnx.errors import InternalError, WireError, from_wire, to_wire

CLASSES = sorted((cls for cls in vars(errors).values()
                  if isinstance(cls, type) and issubclass(cls, errors.CronnxError)), key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_of_the_module_comes_back_as_itself(cls):
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(to_wire(cls("what the client is told"))), type=WireError)
    back = from_wire(wire)
    assert type(back) is cls and back.message == "what the client is told"


def test_a_bug_crosses_as_an_internal_error_with_its_type_and_text():
    back = from_wire(to_wire(KeyError("slot")))
    assert type(back) is InternalError and str(back) == "KeyError: 'slot'"
    assert not isinstance(back, errors.CronnxError)  # answered 500, details in the log only


def test_an_unknown_name_is_an_internal_error():
    back = from_wire(WireError("NoSuchError", "from a newer peer"))
    assert type(back) is InternalError and str(back) == "from a newer peer"


def test_a_subclass_defined_elsewhere_is_not_trusted_by_name():
    class QueueFull(errors.InvalidRequest):  # same name as errors.QueueFull, another class
        pass

    assert to_wire(QueueFull("x")).name == "InternalError"
