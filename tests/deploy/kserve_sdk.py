"""KServe's kinds built field by field from the generated models of KServe's own Python SDK, as
the API server would decode them, for tests/deploy/test_manifests.py.

It runs in a process of its own: importing the SDK loads its gRPC modules, which define the
protobuf package `inference` that tritonclient's gRPC modules define too, and one process can load
only one of them (protobuf refuses the second: "duplicate symbol 'inference.ServerLiveRequest'");
the tests of the gRPC server use tritonclient's.

    python kserve_sdk.py < ITEMS     ITEMS: a JSON list of [value, SDK type name, path]

writes a JSON list with each item's error (null when it is valid).
"""

from __future__ import annotations

import json
import re
import sys

import kserve.models
import kubernetes.client.models


class SchemaError(AssertionError):
    pass


def build_model(value, type_name: str, path: str):
    """Build `value` (parsed YAML) as the SDK model `type_name` ("V1alpha1ServingRuntime",
    "list[V1Container]", "dict(str, str)", ...), as the API server would decode it: every key
    must be a field of its model, of the field's type, and each model's own checks (required
    fields, allowed values) must pass. KServe's models name Kubernetes' core types, which come
    from the Kubernetes client's models. Raises SchemaError naming the path."""
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list ({type_name}), got {value!r}")
        return [build_model(item, match[1], f"{path}[{i}]") for i, item in enumerate(value)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a map ({type_name}), got {value!r}")
        return {key: build_model(item, match[1] or match[2], f"{path}.{key}") for key, item in value.items()}
    primitive = {"str": str, "bool": bool, "int": int, "float": (int, float), "datetime": str, "date": str}
    if type_name in primitive:
        if not isinstance(value, primitive[type_name]) or (type_name in ("int", "float") and isinstance(value, bool)):
            raise SchemaError(f"{path}: expected {type_name}, got {value!r}")
        return value
    if type_name == "object":  # int-or-string, quantities, free-form status
        return value
    model = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
    if not isinstance(value, dict):
        raise SchemaError(f"{path}: expected a {type_name} object, got {value!r}")
    fields = {key: attribute for attribute, key in model.attribute_map.items()}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise SchemaError(f"{path}: {type_name} has no field {', '.join(unknown)}")
    arguments = {fields[key]: build_model(item, model.openapi_types[fields[key]], f"{path}.{key}")
                 for key, item in value.items()}
    try:
        return model(**arguments)
    except ValueError as exc:
        raise SchemaError(f"{path}: {exc}") from None


def main() -> None:
    errors = []
    for value, type_name, path in json.load(sys.stdin):
        try:
            build_model(value, type_name, path)
        except SchemaError as exc:
            errors.append(str(exc))
        else:
            errors.append(None)
    json.dump(errors, sys.stdout)


if __name__ == "__main__":
    main()
