"""The wire protocol, without a broker: control messages, chunking, reassembly, state blobs,
and a property-based attack on every decoder (random bytes and mutated valid messages)."""

import hashlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as p
from common.models import build_model, tier_state

SHA = "ab" * 32


def test_topics_round_trip_and_refuse_wildcards():
    assert p.device_topic("pi-01", "update") == "hmf/v1/devices/pi-01/update"
    assert p.parse_device_topic("hmf/v1/devices/pi-01/update") == ("pi-01", "update")
    for bad in ("hmf/v1/devices/+/update", "hmf/v1/devices/a/b/update", "hmf/v2/devices/a/update",
                "hmf/v1/devices/a/secret", "hmf/v1/devices//update"):
        with pytest.raises(p.ProtocolError):
            p.parse_device_topic(bad)
    with pytest.raises(p.ProtocolError):
        p.device_topic("a/#", "task")


def test_control_round_trip_and_reasons():
    msg = p.make_control("hello", device="pi-01", tier=2, samples=120, software="0.1.0")
    assert p.parse_control(msg, "hello") == {"type": "hello", "device": "pi-01", "tier": 2,
                                              "samples": 120, "software": "0.1.0"}
    cases = {
        b"{" * 10: "malformed json",
        b"[" * 50_000 + b"]" * 50_000: "oversized message",
        b"[" * 30_000 + b"]" * 30_000: "malformed json",  # nesting: RecursionError, caught
        b'{"schema": 2, "type": "hello"}': "unknown schema",
        b'{"schema": 1, "type": "pwn"}': "unexpected message type",
        b'{"schema": 1, "type": "hello", "device": "x", "tier": 4, "samples": 1, '
        b'"software": ""}': "bad field",
        b'{"schema": 1, "type": "hello", "device": "x", "tier": true, "samples": 1, '
        b'"software": ""}': "bad field",
        b'{"schema": 1, "type": "offer", "run": "r", "round": 1, "device": "x", "samples": 1, '
        b'"loss": NaN, "local_acc": null, "blob": {}}': "malformed json",
        b'"just a string"': "malformed json",
    }
    for payload, reason in cases.items():
        with pytest.raises(p.ProtocolError) as e:
            p.parse_control(payload)
        assert e.value.reason == reason, (payload[:40], e.value)
    with pytest.raises(p.ProtocolError, match="unexpected message type"):
        p.parse_control(msg, "offer")


def test_blobref_must_be_consistent():
    ok = {"sha256": SHA, "size": 2_500_000, "chunks": 3, "chunk_bytes": 1_000_000}
    msg = dict(run="r1", round=1, device="d", samples=5, loss=0.5, local_acc=None)
    assert p.parse_control(p.make_control("offer", blob=ok, **msg))["blob"].chunks == 3
    for bad in ({**ok, "chunks": 2}, {**ok, "chunk_bytes": 2_000_000}, {**ok, "size": 0},
                {**ok, "sha256": "AB" * 32}):
        with pytest.raises(p.ProtocolError, match="bad field"):
            p.make_control("offer", blob=bad, **msg)


def test_chunks_reassemble_in_any_order_with_duplicates():
    blob = bytes(range(256)) * 9000  # 2.3 MB -> 3 chunks
    ref, frames = p.chunk_frames(blob, "run1", 4)
    assert ref.chunks == 3 and all(len(f) <= 1024 * 1024 for f in frames)
    r = p.Reassembly(ref)
    for f in (frames[2], frames[0], frames[2], frames[1], frames[0]):
        chunk = p.parse_chunk(f)
        assert chunk.run == "run1" and chunk.round == 4
        r.add(chunk)
    assert r.complete and r.blob() == blob
    assert [r.add(p.parse_chunk(f)) for f in frames] == [False, False, False]


def test_reassembly_refuses_what_does_not_fit_and_bad_checksums():
    blob = b"x" * 2_100_000
    ref, frames = p.chunk_frames(blob, "r", 1)
    r = p.Reassembly(ref)
    other = p.parse_chunk(p.chunk_frames(b"y" * 10, "r", 1)[1][0])
    with pytest.raises(p.ProtocolError, match="unexpected blob"):
        r.add(other)
    short = p.parse_chunk(frames[0][:-1])
    with pytest.raises(p.ProtocolError, match="malformed chunk"):
        r.add(short)
    with pytest.raises(p.ProtocolError, match="missing chunks"):
        r.blob()
    assert r.missing() == [0, 1, 2]
    forged = p.BlobRef(hashlib.sha256(b"other").hexdigest(), ref.size, ref.chunks)
    r = p.Reassembly(forged)
    for f in frames:
        c = p.parse_chunk(f)
        r.add(p.Chunk(c.run, c.round, forged.sha256, c.index, c.count, c.size, c.data))
    with pytest.raises(p.ProtocolError, match="checksum mismatch"):
        r.blob()


def test_state_blob_checks_names_shapes_dtypes_and_finiteness():
    state = tier_state(build_model("mnist", depth=1).state_dict(), 1)
    spec = p.spec_of(state)
    back, meta = p.decode_state(p.encode_state(state, meta={"a": 1}), spec)
    assert meta == {"a": 1} and all(torch.equal(back[k], state[k]) for k in state)
    half = p.encode_state(state, "float16")
    assert len(half) < 0.55 * len(p.encode_state(state))
    back, _ = p.decode_state(half, spec, "float16")
    w = "blocks.0.conv1.weight"
    assert back[w].dtype == torch.float32
    assert torch.allclose(back[w], state[w], atol=1e-3) and not torch.equal(back[w], state[w])
    with pytest.raises(p.ProtocolError, match="tensor dtype"):
        p.decode_state(half, spec, "float32")
    deeper = build_model("mnist", depth=2).state_dict()
    with pytest.raises(p.ProtocolError, match="tensor names"):
        p.decode_state(p.encode_state(deeper), spec)
    reshaped = {**state, w: state[w].reshape(-1)}
    with pytest.raises(p.ProtocolError, match="tensor shape"):
        p.decode_state(p.encode_state(reshaped), spec)
    for bad in (float("nan"), float("inf")):
        poisoned = {**state, w: state[w].clone().fill_(bad)}
        with pytest.raises(p.ProtocolError, match="non-finite"):
            p.decode_state(p.encode_state(poisoned), spec)
    as_int = {**state, w: state[w].to(torch.int32)}
    with pytest.raises(p.ProtocolError, match="tensor dtype"):
        p.decode_state(p.encode_state(as_int), spec)
    with pytest.raises(p.ProtocolError, match="malformed tensors"):
        p.decode_state(b"\x00" * 50, spec)
    overflow = json.dumps({"tensors": {w: {"dtype": "float32", "shape": [2**32, 2**32, 4],
                                           "offset": 0, "nbytes": 0}}, "meta": {}}).encode()
    with pytest.raises(p.ProtocolError, match="malformed tensors"):  # numel overflows int64
        p.decode_state(struct.pack("<Q", len(overflow)) + overflow, spec)


# ---- property-based: decoders only ever return valid values or raise ProtocolError ----------

_STATE = {"w": torch.ones(2, 3), "n": torch.tensor(7)}
_SPEC = p.spec_of(_STATE)
_VALID_BLOB = p.encode_state(_STATE)
_REF, _FRAMES = p.chunk_frames(_VALID_BLOB, "run", 1, chunk_bytes=64)
_VALID_CONTROL = [
    p.make_control("hello", device="d1", tier=None, samples=3, software="x"),
    p.make_control("fetch", run="run", round=1, device="d1", sha256=SHA, missing=[0, 2]),
    p.make_control("offer", run="run", round=1, device="d1", blob=_REF, samples=3, loss=1.0,
                   local_acc=[0.5]),
]


def _decode_everything(payload: bytes) -> None:
    for decode in (p.parse_control, p.parse_chunk):
        try:
            decode(payload)
        except p.ProtocolError:
            pass
    try:
        p.decode_state(payload, _SPEC)
    except p.ProtocolError:
        pass


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flip a byte, 1 delete, 2 insert, 3 truncate."""
    buf = bytearray(data)
    for kind, pos, value in edits:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= value or 1
        elif kind == 1:
            del buf[i]
        elif kind == 2:
            buf.insert(i, value)
        else:
            del buf[i:]
    return bytes(buf)


_edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 255)),
                  min_size=1, max_size=6)
_settings = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(st.binary(max_size=4096))
def test_random_bytes_never_escape_as_other_errors(payload):
    _decode_everything(payload)
    _decode_everything(p.MAGIC + payload)
    _decode_everything(struct.pack("<Q", len(payload)) + payload)


@_settings
@given(st.sampled_from(_VALID_CONTROL + _FRAMES + [_VALID_BLOB]), _edits)
def test_mutated_valid_messages_are_refused_or_still_valid(valid, edits):
    _decode_everything(_mutate(valid, edits))


@_settings
@given(st.permutations(range(len(_FRAMES))), st.lists(st.integers(0, len(_FRAMES) - 1)),
       st.integers(0, len(_FRAMES) - 1), _edits)
def test_reassembly_under_reorder_duplicates_and_corruption(order, dups, victim, edits):
    """Order and duplicates never matter; a corrupted chunk is refused on arrival or caught by
    the whole-blob checksum: the blob handed on is the sent one or nothing."""
    r = p.Reassembly(_REF)
    for i in list(order) + dups:
        frame = _FRAMES[i]
        if i == victim and i not in r.have:
            frame = _mutate(frame, edits)
        try:
            r.add(p.parse_chunk(frame))
        except p.ProtocolError:
            pass
    try:
        blob = r.blob()
    except p.ProtocolError as e:
        assert e.reason in {"missing chunks", "checksum mismatch"}
        return
    assert blob == _VALID_BLOB
    state, _ = p.decode_state(blob, _SPEC)
    assert torch.equal(state["w"], _STATE["w"])


@_settings
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=30),
       st.sampled_from(sorted(p.MESSAGES)))
def test_random_json_in_the_right_envelope(value, kind):
    base = json.loads(_VALID_CONTROL[0])
    payload = json.dumps({**base, "type": kind, "device": value, "tier": value,
                          "blob": value, "run": value}).encode()
    try:
        msg = p.parse_control(payload)
    except p.ProtocolError:
        return
    assert msg["type"] == kind


# ---- structure-aware: valid JSON of the wrong types in every field (issue 19) ----------------

_json_leaf = (st.none() | st.booleans() | st.integers()
              | st.sampled_from([2**31, 2**63, -(2**63), 2**64, 10**30, -1, 0])
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _examples() -> dict[str, bytes]:
    """One valid message of every type, as a device or the cloud would send it."""
    ref = _REF
    graph = p.GraphFile("exit_1.onnx", "exit", 1, "fp32", ref)
    train = {"epochs": 1, "batch_size": 8, "lr": 0.01, "distill": "mutual",
             "distill_weight": 1.0, "temperature": 1.0}
    common = dict(run="run", round=1, device="d1")
    return {
        "hello": _VALID_CONTROL[0], "fetch": _VALID_CONTROL[1], "offer": _VALID_CONTROL[2],
        "bye": p.make_control("bye", device="d1", reason="left"),
        "round": p.make_control("round", run="run", round=1, rounds=2, state="open",
                                deadline=1.0),
        "status": p.make_control("status", state="online"),
        "task": p.make_control("task", **common, model="hapt", depth=1, width=1.0, seed=3,
                               train=train, weights=ref, dtype="float32", deadline=1.0),
        "calibrate": p.make_control("calibrate", **common, model="hapt", weights=ref,
                                    dtype="float32", deadline=1.0),
        "reply": p.make_control("reply", **common, sha256=SHA, status="send", reason=""),
        "model": p.make_control("model", run="run", round=1, model="hapt",
                                format=p.GRAPH_FORMAT, manifest=ref, files=[graph]),
        "fetch_graph": p.make_control("fetch_graph", **common, sha256=SHA, missing=None),
    }


_EXAMPLES = _examples()


def _paths(value, prefix=()):
    """Every place in a JSON value that can be replaced: (keys...) paths, containers too."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(doc, path, value):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


def test_every_message_type_has_an_example():
    assert set(_EXAMPLES) == set(p.MESSAGES)


@_settings
@given(st.sampled_from(sorted(_EXAMPLES)), st.data(), _json)
def test_any_field_of_any_message_replaced_by_any_json(kind, data, value):
    doc = json.loads(_EXAMPLES[kind])
    path = data.draw(st.sampled_from(list(_paths(doc))))
    payload = json.dumps(_replaced(doc, path, value)).encode()
    try:
        msg = p.parse_control(payload)
    except p.ProtocolError:
        return
    assert msg["type"] in p.MESSAGES


def _frame_with_header(head: dict, data: bytes) -> bytes:
    raw = json.dumps(head).encode()
    return p.MAGIC + struct.pack("<I", len(raw)) + raw + data


@_settings
@given(st.data(), _json)
def test_any_chunk_header_field_replaced_by_any_json(data, value):
    frame = _FRAMES[0]
    (hlen,) = struct.unpack("<I", frame[4:8])
    head = json.loads(frame[8 : 8 + hlen])
    path = data.draw(st.sampled_from(list(_paths(head))))
    payload = _frame_with_header(_replaced(head, path, value), frame[8 + hlen :])
    r = p.Reassembly(_REF)
    try:
        r.add(p.parse_chunk(payload))
    except p.ProtocolError:
        pass


def _tensor_header(blob: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + hlen]), blob[8 + hlen :]


@_settings
@given(st.data(), _json)
def test_any_tensor_header_field_replaced_by_any_json(data, value):
    """An update whose tensor-file header holds valid JSON of the wrong type anywhere (a shape
    of ``[true, 6]`` stopped the cloud, issue 19): a ProtocolError, or a checked state."""
    head, body = _tensor_header(_VALID_BLOB)
    path = data.draw(st.sampled_from(list(_paths(head))))
    raw = json.dumps(_replaced(head, path, value)).encode()
    blob = struct.pack("<Q", len(raw)) + raw + body
    try:
        state, meta = p.decode_state(blob, _SPEC)
    except p.ProtocolError:
        return
    assert set(state) == set(_SPEC) and isinstance(meta, dict)
    assert all(tuple(state[k].shape) == _SPEC[k][0] for k in state)
