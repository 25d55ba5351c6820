import json
import struct

import pytest
import torch

from common import tensorfile
from common.tensorfile import TensorFileError, decode, encode


def test_roundtrip_all_dtypes(tmp_path):
    tensors = {
        "w": torch.randn(3, 4, 5),
        "h": torch.randn(7).half(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6).t(),
        "mask": torch.tensor([True, False]),
    }
    back, meta = decode(encode(tensors, {"round": 3}))
    assert meta == {"round": 3}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    tensorfile.save(tmp_path / "c.hmf", tensors, {"a": 1})
    assert torch.equal(tensorfile.load(tmp_path / "c.hmf")[0]["w"], tensors["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.hmf"]  # no temp file left behind


def _blob_with_header(header: dict, data: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize("blob", [
    b"",
    b"\x01\x02",
    struct.pack("<Q", 10**9) + b"{}",
    _blob_with_header({"tensors": {}}),  # no meta
    _blob_with_header({"tensors": [], "meta": {}}),
    _blob_with_header({"tensors": {"a": {"dtype": "object", "shape": [1], "offset": 0,
                                         "nbytes": 4}}, "meta": {}}, b"\0" * 4),
    _blob_with_header({"tensors": {"a": {"dtype": "float32", "shape": [2], "offset": 0,
                                         "nbytes": 8}}, "meta": {}}, b"\0" * 4),  # truncated
    _blob_with_header({"tensors": {"a": {"dtype": "float32", "shape": [-1], "offset": 0,
                                         "nbytes": 4}}, "meta": {}}, b"\0" * 4),
    _blob_with_header({"tensors": {"a": {"dtype": "float32", "shape": [2], "offset": 0,
                                         "nbytes": 4}}, "meta": {}}, b"\0" * 8),  # size lie
])
def test_malformed_blobs_are_rejected(blob):
    with pytest.raises(TensorFileError):
        decode(blob)


def test_huge_shape_is_rejected_not_overflowed():
    blob = _blob_with_header({"tensors": {"a": {"dtype": "float32", "shape": [2**32, 2**32, 4],
                                                "offset": 0, "nbytes": 0}}, "meta": {}})
    with pytest.raises(TensorFileError):
        decode(blob)


def _entry_blob(**entry) -> bytes:
    base = {"dtype": "float32", "shape": [2, 3], "offset": 0, "nbytes": 24}
    return _blob_with_header({"tensors": {"a": {**base, **entry}}, "meta": {}}, b"\0" * 24)


@pytest.mark.parametrize("entry", [
    {"shape": [True, 6]},  # issue 19: bool is an int to Python; reshape raised TypeError
    {"shape": [6, False]},
    {"shape": [2.0, 3]},
    {"shape": [[2], 3]},
    {"shape": [-2, -3]},
    {"shape": [2**70, 0]},
    {"shape": [0, 2**63], "nbytes": 0},
    {"shape": [1] * 64 + [6]},
    {"shape": "23"},
    {"shape": None},
    {"dtype": ["float32"]},
    {"dtype": {"a": 1}},
    {"dtype": 7},
    {"offset": True},
    {"offset": -1},
    {"offset": 0.0},
    {"nbytes": 24.0},
    {"nbytes": 2**80},
    {"offset": 2**70},
])
def test_wrongly_typed_header_fields_are_rejected(entry):
    with pytest.raises(TensorFileError):
        decode(_entry_blob(**entry))


@pytest.mark.parametrize("header", [
    b"[" * 100_000,  # nesting deeper than Python's stack
    b'{"tensors": {}, "meta": NaN}',
    b'"text"',
    b"\xff\xfe",
    b'{"tensors": {"a": [1, 2]}, "meta": {}}',
    b'{"tensors": {"a": "x"}, "meta": {}}',
])
def test_malformed_header_json_is_rejected(header):
    with pytest.raises(TensorFileError):
        decode(struct.pack("<Q", len(header)) + header)
