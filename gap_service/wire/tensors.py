"""gap.v1.Tensor <-> numpy: raw little-endian bytes, with dtype, shape and byte count checked."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError, invalid
from . import pb

T = pb.tensor

# proto DataType <-> numpy dtype (little-endian).
DTYPES: dict[int, np.dtype] = {
    T.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    T.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    T.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    T.DATA_TYPE_UINT8: np.dtype("u1"),
    T.DATA_TYPE_INT8: np.dtype("i1"),
    T.DATA_TYPE_INT32: np.dtype("<i4"),
    T.DATA_TYPE_INT64: np.dtype("<i8"),
}
_BY_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in DTYPES.items()}
MAX_DIMS = 8
MAX_ELEMENTS = 2**31 - 1  # a gRPC message (at most 2 GiB) holds fewer


def dtype_code(dtype: np.dtype | type | str) -> int:
    dtype = np.dtype(dtype)
    code = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None:
        raise InvalidInputError(f"dtype {dtype} has no gap.v1.DataType")
    return code


def dtype_name(code: int) -> str:
    try:
        return T.DataType.Name(code)
    except ValueError:
        return str(code)


def to_tensor(array: np.ndarray, dtype: np.dtype | str | None = None, name: str = "") -> pb.tensor.Tensor:
    """A numpy array as a raw little-endian Tensor (optionally cast to ``dtype``)."""
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    code = dtype_code(array.dtype)
    data = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
    return T.Tensor(dtype=code, shape=list(array.shape), data=data, name=name)


def from_tensor(tensor: pb.tensor.Tensor, field: str = "tensor") -> np.ndarray:
    """A Tensor as a numpy array (native byte order), checking dtype, shape and byte count.

    Sizes are computed with Python integers, so no shape can overflow into a wrong byte count.
    Dimensions (zeros aside) multiply to at most ``MAX_ELEMENTS``: larger shapes could never
    arrive with their data, and numpy cannot even make empty arrays of them.
    """
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise invalid(f"{field}.dtype", f"{dtype_name(tensor.dtype)} is not a valid element type")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMS:
        raise invalid(f"{field}.shape", f"rank {len(shape)} exceeds {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise invalid(f"{field}.shape", f"{list(shape)} has negative dimensions")
    # numpy refuses (ValueError) shapes whose non-zero dims multiply past its index range, even empty ones.
    elements = math.prod(d for d in shape if d)
    if elements > MAX_ELEMENTS:
        raise invalid(f"{field}.shape", f"{list(shape)}: its dimensions multiply to {elements} elements, "
                                        f"more than a tensor may have ({MAX_ELEMENTS})")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise invalid(f"{field}.data",
                      f"has {len(tensor.data)} bytes; shape {list(shape)} of {dtype_name(tensor.dtype)} needs {expected}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
