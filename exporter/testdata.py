"""ONNX model-zoo test data: ``input_<i>.pb`` / ``output_<i>.pb`` TensorProto files, and ONNX dims.

The one place where exporter turns arrays into ``TensorProto`` bytes and back (bundles,
the Node runtime's exchange files), and where an ONNX ``ValueInfoProto``'s shape becomes
a list of dims.  Uses ``onnx.numpy_helper``; imports onnx lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import BundleError

__all__ = ["value_dims", "write_tensors", "read_tensors", "write_test_data", "read_test_data"]


def value_dims(value_info: Any) -> list[int | str | None] | None:
    """Dims of an ONNX tensor ``ValueInfoProto``: ints (static), names (symbolic), None (unknown).

    Returns None when the value has no shape at all (unknown rank) or is not a tensor.
    """
    if value_info.type.WhichOneof("value") != "tensor_type":
        return None
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        kind = d.WhichOneof("value")
        dims.append(d.dim_value if kind == "dim_value" else d.dim_param if kind == "dim_param" else None)
    return dims


def _index(p: Path) -> int:
    tail = p.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def write_tensors(directory: str | os.PathLike[str], prefix: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``<prefix>_<i>.pb`` for each array, in order, named after its key.

    Plain writes: callers that need durability write into an ``exporter.atomic`` directory,
    which fsyncs every file once when it is published.
    """
    from onnx import numpy_helper

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for i, (name, value) in enumerate(arrays.items()):
        tensor = numpy_helper.from_array(np.asarray(value, order="C"), name=name)  # (ascontiguousarray makes 0-d 1-d)
        (d / f"{prefix}_{i}.pb").write_bytes(tensor.SerializeToString())


def read_tensors(directory: str | os.PathLike[str], prefix: str) -> dict[str, np.ndarray]:
    """Read ``<prefix>_<i>.pb`` files in index order, keyed by the TensorProto names (else the file stem).

    Raises:
        BundleError: a file that is not a valid TensorProto.
    """
    from onnx import TensorProto, numpy_helper

    arrays: dict[str, np.ndarray] = {}
    for f in sorted(Path(directory).glob(f"{prefix}_*.pb"), key=_index):
        t = TensorProto()
        try:
            t.ParseFromString(f.read_bytes())
            arr = numpy_helper.to_array(t)
        except Exception as e:  # protobuf DecodeError and friends: untrusted bytes
            raise BundleError(f"test data file {f} is not a valid ONNX TensorProto ({e}); re-export the bundle") from e
        arrays[t.name or f.stem] = arr
    return arrays


def write_test_data(directory: str | os.PathLike[str], inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    """Write one test data set: ``input_<i>.pb`` and ``output_<i>.pb`` in the given order."""
    write_tensors(directory, "input", inputs)
    write_tensors(directory, "output", outputs)


def read_test_data(directory: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read one test data set back: ``(inputs, outputs)`` keyed by the TensorProto names, in file order.

    Raises:
        BundleError: no input files, or a file that is not a TensorProto.
    """
    inputs = read_tensors(directory, "input")
    if not inputs:
        raise BundleError(f"test data set {directory} has no input_<i>.pb files; re-export the bundle")
    return inputs, read_tensors(directory, "output")
