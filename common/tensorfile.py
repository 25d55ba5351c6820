"""Named tensors as bytes, with no code in them: checkpoints on disk and weights on the wire.

Layout (like safetensors): 8-byte little-endian header length, a UTF-8 JSON header, then the raw
little-endian tensor bytes. The header holds ``{"tensors": {name: {"dtype", "shape", "offset",
"nbytes"}}, "meta": {...}}``. Decoding checks every field before touching the data, so a corrupt
or hostile blob raises ``TensorFileError`` and never runs code (nothing is unpickled).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 64 * 1024 * 1024
MAX_DIMS = 16  # no tensor of ours has more than 4; a header claiming more is not ours
MAX_DIM = 2**40  # bounds zero-element shapes too (the data bounds every other one)
# Raw bytes are written in the host's order; every board we target (x86-64, aarch64) is little.
assert sys.byteorder == "little", "hmf's tensor files assume a little-endian host"


class TensorFileError(ValueError):
    """A blob that is not a well-formed tensor file."""


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> bytes:
    """Serialise ``tensors`` (any device, contiguous or not) and a JSON-able ``meta``."""
    header: dict[str, Any] = {"tensors": {}, "meta": meta or {}}
    chunks, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} is not supported")
        data = t.detach().cpu().contiguous().numpy().tobytes()
        header["tensors"][name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                                   "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def decode(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of ``encode``; raises ``TensorFileError`` naming what is wrong, and nothing else,
    whatever the blob holds (it may come from a hostile device)."""
    if len(blob) < 8:
        raise TensorFileError("blob shorter than its 8-byte header length")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > min(MAX_HEADER, len(blob) - 8):
        raise TensorFileError(f"header length {hlen} exceeds the blob ({len(blob)} bytes)")
    entries, meta = _header(blob[8 : 8 + hlen])
    data, tensors = memoryview(blob)[8 + hlen :], {}
    for name, e in entries.items():
        tensors[name] = _tensor(name, e, data)
    return tensors, meta


def _header(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header's tensor entries and meta, both JSON objects."""
    try:
        header = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the stack
        raise TensorFileError(f"malformed header: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise TensorFileError("malformed header: not an object")
    entries, meta = header.get("tensors"), header.get("meta")
    if not isinstance(entries, dict) or not isinstance(meta, dict):
        raise TensorFileError("malformed header: tensors and meta must be objects")
    return entries, meta


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _count(v: Any, limit: int) -> bool:
    """A JSON integer in 0..limit; ``bool`` is an ``int`` to Python, not to us."""
    return type(v) is int and 0 <= v <= limit


def _entry(name: str, e: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, offset, nbytes) of one header entry, each of the exact JSON type."""
    if not isinstance(e, dict):
        raise TensorFileError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offset, nbytes = (e.get(k) for k in ("dtype", "shape", "offset", "nbytes"))
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise TensorFileError(f"tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            _count(d, MAX_DIM) for d in shape):
        raise TensorFileError(f"tensor {name!r}: bad shape {str(shape)[:80]}")
    if not (_count(offset, MAX_HEADER + 2**40) and _count(nbytes, 2**40)):
        raise TensorFileError(f"tensor {name!r}: bad offset or nbytes")
    return DTYPES[dtype], tuple(shape), offset, nbytes


def _tensor(name: str, e: Any, data: memoryview) -> torch.Tensor:
    dtype, shape, offset, nbytes = _entry(name, e)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if nbytes != itemsize * math.prod(shape) or offset + nbytes > len(data):  # no overflow
        raise TensorFileError(f"tensor {name!r}: {nbytes} bytes at {offset} do not fit "
                              f"shape {list(shape)} {e['dtype']} in {len(data)} data bytes")
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    try:
        arr = np.frombuffer(data, dtype=np_dtype, count=nbytes // itemsize, offset=offset)
        return torch.from_numpy(arr.copy()).reshape(shape)
    except (ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as err:
        raise TensorFileError(f"tensor {name!r}: {str(err)[:200]}") from None


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
         meta: dict[str, Any] | None = None) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode(tensors, meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return decode(Path(path).read_bytes())
