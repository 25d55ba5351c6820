"""The wire protocol between the hmf cloud and its devices over MQTT (docs/PROTOCOL.md).

Everything here is pure (no broker, no threads), so every rule can be tested in isolation and
fuzzed. Anything read from the network goes through a function of this module that either
returns a validated value or raises ``ProtocolError`` with a short reason: callers log the
reason and carry on, so hostile or broken input never stops a cloud or a device.

Three kinds of payload travel:
- control messages: small JSON objects with ``schema`` (the protocol version) and ``type``;
- chunk frames: ``MAGIC``, a 4-byte little-endian header length, a JSON header naming the blob's
  sha256, the chunk's index and the chunk count, then at most ``CHUNK_BYTES`` raw bytes;
- blobs (reassembled from chunks): tensor files (``common.tensorfile``), which hold no code, so
  nothing received is ever unpickled; or the served model's ONNX graphs and ``manifest.json``,
  raw bytes checked against the sha256 of the ``model`` message and written under bare file
  names that ``GRAPH_FILE`` allows (nothing from the network names a path).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common import manifest, tensorfile

SCHEMA = 1
PREFIX = "hmf/v1"
CHUNK_BYTES = 1_000_000  # data per chunk; with its header a frame stays under 1 MiB
MAX_CONTROL_BYTES = 64 * 1024
MAX_CHUNK_HEADER = 2048
MAX_FRAME_BYTES = CHUNK_BYTES + MAX_CHUNK_HEADER + 8
MAX_BLOB_BYTES = 512 * 1024 * 1024
MAGIC = b"HMFC"
MAX_GRAPH_BYTES = 128 * 1024 * 1024  # one served ONNX graph (STL-10's deepest is ~23 MB)
MAX_MANIFEST_BYTES = 1024 * 1024  # a served manifest.json (a few KB in practice)
MAX_GRAPH_FILES = 64
GRAPH_FORMAT = manifest.FORMAT
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# A served graph's name: bare (no "/"), not hidden, at most 64 characters, ending in ".onnx".
GRAPH_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,58}\.onnx")

# Topics: what the cloud publishes to everyone, and each device's own sub-tree.
CLOUD_TOPICS = ("round", "status", "model")
DEVICE_UP = ("presence", "request", "update")  # device -> cloud
DEVICE_DOWN = ("task", "weights", "reply", "graphs")  # cloud -> device


class ProtocolError(ValueError):
    """Input that breaks the protocol; ``reason`` is a short stable code for logs and counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def printable(text: Any, limit: int = 200) -> str:
    """``text`` safe to print on one log line: every control, format, separator or unassigned
    character (newlines, ANSI escapes, bidi overrides) escaped as Python writes it, and at
    most ``limit`` characters kept. Whatever a device sends is printed through this, so it can
    neither forge log lines nor flood the log."""
    text = text if isinstance(text, str) else str(text)
    cut = len(text) - limit
    out = "".join(ch.encode("unicode_escape").decode("ascii")
                  if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch
                  for ch in text[:limit])
    return out + (f"... ({cut} more characters)" if cut > 0 else "")


# ---------------------------------------------------------------------------------------------
# Topics


def cloud_topic(name: str) -> str:
    if name not in CLOUD_TOPICS:
        raise ValueError(f"unknown cloud topic {name!r}")
    return f"{PREFIX}/cloud/{name}"


def device_topic(device: str, name: str) -> str:
    if name not in DEVICE_UP + DEVICE_DOWN and name != "+":
        raise ValueError(f"unknown device topic {name!r}")
    if device != "+":
        check_device_id(device)
    return f"{PREFIX}/devices/{device}/{name}"


def parse_device_topic(topic: str) -> tuple[str, str]:
    """(device, name) of ``hmf/v1/devices/<device>/<name>``."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices":
        raise ProtocolError("bad topic", topic[:200])
    device, name = parts[3], parts[4]
    check_device_id(device)
    if name not in DEVICE_UP + DEVICE_DOWN:
        raise ProtocolError("bad topic", topic[:200])
    return device, name


def check_device_id(device: Any) -> str:
    """Device ids are topic levels and broker user names: a safe, short alphabet only."""
    if not isinstance(device, str) or not DEVICE_ID.fullmatch(device):
        raise ProtocolError("bad device id", repr(device)[:80])
    return device


# ---------------------------------------------------------------------------------------------
# Field validators: each returns the value or raises ProtocolError("bad field", ...).


def _bad(field: str, value: Any) -> ProtocolError:
    return ProtocolError("bad field", f"{field}={str(value)[:80]!r}")


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(field: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _bad(field, v)
        return v
    return check


def _number(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(field: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise _bad(field, v)
        return float(v)
    return check


def _optional(inner: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def check(field: str, v: Any) -> Any:
        return None if v is None else inner(field, v)
    return check


def _text(pattern: re.Pattern[str] | None = None, limit: int = 200) -> Callable[[str, Any], str]:
    def check(field: str, v: Any) -> str:
        if not isinstance(v, str) or len(v) > limit or (pattern and not pattern.fullmatch(v)):
            raise _bad(field, v)
        return v
    return check


def _choice(*options: str) -> Callable[[str, Any], str]:
    def check(field: str, v: Any) -> str:
        if v not in options:
            raise _bad(field, v)
        return v
    return check


def _floats(limit: int) -> Callable[[str, Any], list[float]]:
    def check(field: str, v: Any) -> list[float]:
        if not isinstance(v, list) or len(v) > limit:
            raise _bad(field, v)
        return [_number(0.0, 1.0)(field, x) for x in v]
    return check


def _ints(limit: int, hi: int) -> Callable[[str, Any], list[int]]:
    def check(field: str, v: Any) -> list[int]:
        if not isinstance(v, list) or len(v) > limit:
            raise _bad(field, v)
        return [_int(0, hi)(field, x) for x in v]
    return check


@dataclass(frozen=True)
class BlobRef:
    """What a receiver needs to reassemble and verify a blob before the first chunk arrives."""

    sha256: str
    size: int
    chunks: int
    chunk_bytes: int = CHUNK_BYTES

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "chunks": self.chunks,
                "chunk_bytes": self.chunk_bytes}


def _blobref(field: str, v: Any) -> BlobRef:
    if not isinstance(v, dict):
        raise _bad(field, v)
    sha = _text(SHA256, 64)(f"{field}.sha256", v.get("sha256"))
    size = _int(1, MAX_BLOB_BYTES)(f"{field}.size", v.get("size"))
    chunk = _int(1, CHUNK_BYTES)(f"{field}.chunk_bytes", v.get("chunk_bytes"))
    chunks = _int(1, MAX_BLOB_BYTES)(f"{field}.chunks", v.get("chunks"))
    if chunks != math.ceil(size / chunk):
        raise ProtocolError("bad field", f"{field}: {chunks} chunks cannot hold {size} bytes "
                                         f"in chunks of {chunk}")
    return BlobRef(sha, size, chunks, chunk)


def _capped_blobref(limit: int) -> Callable[[str, Any], BlobRef]:
    """A blob reference no larger than ``limit``: a receiver allocates its size up front."""
    def check(field: str, v: Any) -> BlobRef:
        ref = _blobref(field, v)
        if ref.size > limit:
            raise ProtocolError("oversized graph", f"{field}: {ref.size} bytes > {limit}")
        return ref
    return check


@dataclass(frozen=True)
class GraphFile:
    """One file of a served model: a bare ``file`` name, what it computes, and its blob."""

    file: str
    kind: str  # "exit" or "segment"
    index: int  # 1..3
    precision: str  # "fp32" or "int8"
    blob: BlobRef

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "index": self.index,
                "precision": self.precision, "blob": self.blob.to_json()}


def _graph_file(field: str, v: Any) -> GraphFile:
    if not isinstance(v, dict):
        raise _bad(field, v)
    return GraphFile(_text(GRAPH_FILE, 64)(f"{field}.file", v.get("file")),
                     _choice("exit", "segment")(f"{field}.kind", v.get("kind")),
                     _TIER(f"{field}.index", v.get("index")),
                     _choice("fp32", "int8")(f"{field}.precision", v.get("precision")),
                     _capped_blobref(MAX_GRAPH_BYTES)(f"{field}.blob", v.get("blob")))


def _graph_files(field: str, v: Any) -> list[GraphFile]:
    """1..MAX_GRAPH_FILES entries; names and (kind, index, precision) each appear once."""
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_GRAPH_FILES:
        raise _bad(field, v)
    files = [_graph_file(f"{field}[{i}]", x) for i, x in enumerate(v)]
    if len({f.file for f in files}) != len(files) or len(
            {(f.kind, f.index, f.precision) for f in files}) != len(files):
        raise ProtocolError("bad field", f"{field}: a file name or graph appears twice")
    return files


def _train(field: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(field, v)
    out = {"epochs": _int(1, 10_000)(f"{field}.epochs", v.get("epochs")),
           "batch_size": _int(1, 1_000_000)(f"{field}.batch_size", v.get("batch_size")),
           "lr": _number(0.0, 100.0)(f"{field}.lr", v.get("lr"))}
    if v.get("distill") is not None:  # absent or null: the plain joint loss
        out["distill"] = _choice("mutual", "deepest")(f"{field}.distill", v["distill"])
        out["distill_weight"] = _number(0.0, 1e3)(f"{field}.distill_weight",
                                                  v.get("distill_weight"))
        out["temperature"] = _number(1e-3, 1e3)(f"{field}.temperature", v.get("temperature"))
    return out


_DEVICE = _text(DEVICE_ID, 64)
# "calibrating": a round's updates are aggregated and its devices compute BatchNorm statistics
ROUND_STATES = ("open", "calibrating", "closed", "finished")
_RUN = _text(RUN_ID, 64)
_ROUND = _int(0, 10_000_000)
_TIER = _int(1, 3)
_TIME = _number(0.0, 1e11)

# type -> field -> validator; every listed field is required (None allowed where optional).
MESSAGES: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    # device -> cloud, retained on its presence topic
    "hello": {"device": _DEVICE, "tier": _optional(_TIER), "samples": _int(0, 10**9),
              "software": _text(limit=64)},
    "bye": {"device": _DEVICE, "reason": _text(limit=200)},
    # cloud -> everyone
    "round": {"run": _RUN, "round": _ROUND, "rounds": _int(1, 10_000_000),
              "state": _choice(*ROUND_STATES), "deadline": _TIME},
    "status": {"state": _choice("online", "offline")},
    # cloud -> one device, retained
    "task": {"run": _RUN, "round": _ROUND, "device": _DEVICE, "model": _text(limit=64),
             "depth": _TIER, "width": _number(1e-6, 1.0), "seed": _int(0, 2**63 - 1),
             "train": _train, "weights": _blobref, "dtype": _choice(*WIRE_DTYPES),
             "deadline": _TIME},
    # cloud -> one device, retained on its task topic after its update was accepted (static
    # BatchNorm): recompute the BN statistics of the full model ``weights`` on local train data
    "calibrate": {"run": _RUN, "round": _ROUND, "device": _DEVICE, "model": _text(limit=64),
                  "weights": _blobref, "dtype": _choice(*WIRE_DTYPES), "deadline": _TIME},
    # device -> cloud requests
    "fetch": {"run": _RUN, "round": _ROUND, "device": _DEVICE, "sha256": _text(SHA256, 64),
              "missing": _optional(_ints(100_000, MAX_BLOB_BYTES))},
    "offer": {"run": _RUN, "round": _ROUND, "device": _DEVICE, "blob": _blobref,
              "samples": _int(0, 10**9), "loss": _optional(_number(-1e30, 1e30)),
              "local_acc": _optional(_floats(8))},
    # cloud -> device replies to an offer
    "reply": {"run": _RUN, "round": _ROUND, "device": _DEVICE, "sha256": _text(SHA256, 64),
              "status": _choice("send", "wait", "accepted", "rejected"),
              "reason": _text(limit=300),
              # with "send": the chunks the cloud still lacks (null or absent: all of them)
              "missing": _optional(_ints(100_000, MAX_BLOB_BYTES))},
    # cloud -> everyone, retained: the latest global model as ONNX graphs (docs/PROTOCOL.md)
    "model": {"run": _RUN, "round": _ROUND, "model": _text(limit=64),
              "format": _choice(GRAPH_FORMAT),
              "manifest": _capped_blobref(MAX_MANIFEST_BYTES), "files": _graph_files},
    # device -> cloud: chunks of one file of the current model message
    "fetch_graph": {"run": _RUN, "round": _ROUND, "device": _DEVICE,
                    "sha256": _text(SHA256, 64),
                    "missing": _optional(_ints(100_000, MAX_BLOB_BYTES))},
}


# Fields added to a message type after it was first shipped: a receiver reads them as None
# when an older sender leaves them out (same schema: old receivers ignore them).
OPTIONAL: dict[str, set[str]] = {"reply": {"missing"}}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _wire(v: Any) -> Any:
    """Blob references and graph entries (also inside lists) as their JSON objects."""
    if isinstance(v, (BlobRef, GraphFile)):
        return v.to_json()
    if isinstance(v, list):
        return [_wire(x) for x in v]
    return v


def make_control(kind: str, **fields: Any) -> bytes:
    """A control message, validated as a receiver would (a sender bug fails here, loudly)."""
    msg = {"schema": SCHEMA, "type": kind, **{k: _wire(v) for k, v in fields.items()}}
    payload = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    parse_control(payload, kind)
    return payload


def parse_control(payload: bytes, *kinds: str) -> dict[str, Any]:
    """Validate a control message; ``kinds`` restricts the accepted types (all if empty).

    Returns ``{"type": ..., field: value}`` with only the known fields; blob references become
    ``BlobRef``, a model's files ``GraphFile``. Unknown extra fields are ignored (a newer
    sender of the same schema)."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError("oversized message", f"{len(payload)} bytes > {MAX_CONTROL_BYTES}")
    try:
        msg = json.loads(payload, parse_constant=_no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ProtocolError("malformed json", str(e)[:120]) from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed json", "not an object")
    if msg.get("schema") != SCHEMA:
        raise ProtocolError("unknown schema", repr(msg.get("schema"))[:40])
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in MESSAGES or (kinds and kind not in kinds):
        raise ProtocolError("unexpected message type", repr(kind)[:40])
    out: dict[str, Any] = {"type": kind}
    for name, check in MESSAGES[kind].items():
        if name not in msg and name in OPTIONAL.get(kind, ()):
            out[name] = None
        elif name not in msg:
            raise ProtocolError("bad field", f"{name} missing")
        else:
            out[name] = check(name, msg[name])
    return out


# ---------------------------------------------------------------------------------------------
# Chunks


@dataclass(frozen=True)
class Chunk:
    run: str
    round: int
    sha256: str  # of the whole blob
    index: int
    count: int
    size: int  # of the whole blob
    data: bytes | memoryview


def blob_ref(blob: bytes, chunk_bytes: int = CHUNK_BYTES) -> BlobRef:
    return BlobRef(hashlib.sha256(blob).hexdigest(), len(blob),
                   max(1, math.ceil(len(blob) / chunk_bytes)), chunk_bytes)


def chunk_frame(blob: bytes, ref: BlobRef, index: int, run: str, server_round: int) -> bytes:
    """Frame ``index`` of ``blob``: magic, header length, JSON header, data."""
    start = index * ref.chunk_bytes
    header = json.dumps({"schema": SCHEMA, "run": run, "round": server_round,
                         "sha256": ref.sha256, "index": index, "count": ref.chunks,
                         "size": ref.size}, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + blob[start : start + ref.chunk_bytes]


def chunk_frames(blob: bytes, run: str, server_round: int,
                 chunk_bytes: int = CHUNK_BYTES) -> tuple[BlobRef, list[bytes]]:
    """All frames of ``blob`` (for tests and small blobs; big senders call ``chunk_frame``)."""
    ref = blob_ref(blob, chunk_bytes)
    return ref, [chunk_frame(blob, ref, i, run, server_round) for i in range(ref.chunks)]


def parse_chunk(payload: bytes) -> Chunk:
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError("oversized chunk", f"{len(payload)} bytes")
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise ProtocolError("malformed chunk", "no chunk magic")
    (hlen,) = struct.unpack("<I", payload[4:8])
    if hlen > min(MAX_CHUNK_HEADER, len(payload) - 8):
        raise ProtocolError("malformed chunk", f"header length {hlen}")
    try:
        head = json.loads(payload[8 : 8 + hlen], parse_constant=_no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ProtocolError("malformed chunk", str(e)[:120]) from None
    if not isinstance(head, dict):
        raise ProtocolError("malformed chunk", "header is not an object")
    if head.get("schema") != SCHEMA:
        raise ProtocolError("unknown schema", repr(head.get("schema"))[:40])
    try:
        chunk = Chunk(_RUN("run", head.get("run")), _ROUND("round", head.get("round")),
                      _text(SHA256, 64)("sha256", head.get("sha256")),
                      _int(0, MAX_BLOB_BYTES)("index", head.get("index")),
                      _int(1, MAX_BLOB_BYTES)("count", head.get("count")),
                      _int(1, MAX_BLOB_BYTES)("size", head.get("size")),
                      memoryview(payload)[8 + hlen :])  # no copy: Reassembly copies once
    except ProtocolError as e:
        raise ProtocolError("malformed chunk", e.detail) from None
    if chunk.index >= chunk.count:
        raise ProtocolError("malformed chunk", f"index {chunk.index} of {chunk.count}")
    return chunk


class Reassembly:
    """One blob being received: duplicates are ignored, each chunk's length is checked against
    the announced ``BlobRef`` and the whole is verified by sha256. Memory: the blob's size."""

    def __init__(self, ref: BlobRef) -> None:
        self.ref = ref
        self.buffer = bytearray(ref.size)
        self.have: set[int] = set()

    def expected_length(self, index: int) -> int:
        return min(self.ref.chunk_bytes, self.ref.size - index * self.ref.chunk_bytes)

    def add(self, chunk: Chunk) -> bool:
        """Store ``chunk``; False for a duplicate. Raises ProtocolError if it does not fit."""
        ref = self.ref
        if chunk.sha256 != ref.sha256:
            raise ProtocolError("unexpected blob", chunk.sha256[:16])
        if chunk.count != ref.chunks or chunk.size != ref.size:
            raise ProtocolError("malformed chunk", f"count/size {chunk.count}/{chunk.size} vs "
                                                   f"announced {ref.chunks}/{ref.size}")
        if chunk.index in self.have:
            return False
        want = self.expected_length(chunk.index)
        if len(chunk.data) != want:
            raise ProtocolError("malformed chunk", f"chunk {chunk.index} has {len(chunk.data)} "
                                                   f"bytes, expected {want}")
        start = chunk.index * ref.chunk_bytes
        self.buffer[start : start + len(chunk.data)] = chunk.data
        self.have.add(chunk.index)
        return True

    @property
    def complete(self) -> bool:
        return len(self.have) == self.ref.chunks

    def missing(self) -> list[int]:
        return [i for i in range(self.ref.chunks) if i not in self.have]

    def blob(self) -> bytes:
        """The verified blob; raises ProtocolError on a checksum mismatch."""
        if not self.complete:
            raise ProtocolError("missing chunks", str(self.missing()[:20]))
        blob = bytes(self.buffer)
        if hashlib.sha256(blob).hexdigest() != self.ref.sha256:
            raise ProtocolError("checksum mismatch", self.ref.sha256[:16])
        return blob


# ---------------------------------------------------------------------------------------------
# Model states as blobs

TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def spec_of(state: dict[str, torch.Tensor]) -> TensorSpec:
    """Names, shapes and dtypes a received state must have exactly."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def encode_state(state: dict[str, torch.Tensor], dtype: str = "float32",
                 meta: dict[str, Any] | None = None) -> bytes:
    """A state as a tensor file; floating tensors travel as ``dtype`` (fp16 halves the bytes)."""
    wire = WIRE_DTYPES[dtype]
    return tensorfile.encode({k: v.to(wire) if v.is_floating_point() else v
                              for k, v in state.items()}, meta)


def decode_state(blob: bytes, expected: TensorSpec, dtype: str = "float32"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode and check a state against ``expected``: same names, shapes and dtypes (floating
    ones as ``dtype`` on the wire), all values finite. Floats come back as expected's dtype."""
    try:
        tensors, meta = tensorfile.decode(blob)
    except (ValueError, RuntimeError, OverflowError, MemoryError) as e:  # e.g. shape overflow
        raise ProtocolError("malformed tensors", str(e)[:200]) from None
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ProtocolError("tensor names", f"missing {missing[:5]}, unexpected {extra[:5]}")
    wire = WIRE_DTYPES[dtype]
    out = {}
    for name, (shape, want) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ProtocolError("tensor shape", f"{name}: {tuple(t.shape)} instead of {shape}")
        on_wire = wire if want.is_floating_point else want
        if t.dtype != on_wire:
            raise ProtocolError("tensor dtype", f"{name}: {t.dtype} instead of {on_wire}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ProtocolError("non-finite values", name)
        out[name] = t.to(want)
    return out, meta


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics (static BN): what a device uploads instead of data

MAX_BN_BATCHES = 10**9


def check_bn_statistics(stats: dict[str, torch.Tensor]) -> None:
    """Refuse statistics no device can have computed (``decode_state`` has already checked
    names, shapes, dtypes and finiteness): a layer's ``num_batches_tracked`` must be positive
    and the same for every layer (each batch passes every layer of the full model), variances
    must be non-negative."""
    counts = {int(v) for k, v in stats.items() if k.endswith(".num_batches_tracked")}
    if len(counts) != 1 or not 1 <= next(iter(counts)) <= MAX_BN_BATCHES:
        raise ProtocolError("bad statistics", f"batch counts {sorted(counts)[:5]}")
    for name, t in stats.items():
        if name.endswith(".running_var") and bool((t < 0).any()):
            raise ProtocolError("bad statistics", f"{name}: negative variance")
