"""The samples ``hmf-device predict`` classifies: a ``.npy`` file, or an array of a ``.npz``.

Arrays are read lazily, a batch of rows at a time, wherever the file allows it (a ``.npy``, or a
``.npz`` written by ``np.savez``, whose members are stored uncompressed): a board with 1 GB of
memory can classify a file larger than its memory, and memory does not grow with the file.
Plain reads, not ``mmap``: pages of a mapped file count towards the process's resident memory
until the kernel needs them back. A compressed member (``np.savez_compressed``) is read once,
whole. Nothing is ever unpickled: a file from elsewhere may hold a pickle that runs code.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
NUMERIC_KINDS = "fiu"  # float, signed and unsigned integer


class InputError(ValueError):
    """An input file that cannot be classified: the message says why and what to do."""


class ArrayFile:
    """A C-ordered array stored raw at ``offset`` in ``path``, read by rows on indexing: an
    array-like with ``shape``, ``dtype``, ``len`` and ``[start:stop]`` (which returns an
    ``np.ndarray`` of those rows)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.ndim = len(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ArrayFile reads contiguous rows only: use x[start:stop]")
        start, stop, _ = index.indices(len(self))
        n = max(stop - start, 0)
        buf = bytearray(n * self.row_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            got = f.readinto(buf)
        if got != len(buf):
            raise InputError(f"{self.path} is truncated: rows {start}..{stop} are not all there")
        return np.frombuffer(buf, self.dtype).reshape(n, *self.shape[1:])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole array (for small inputs and numpy functions that need one)."""
        return np.asarray(self[:], dtype)


def _header(f: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a .npy header; refuses object arrays."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise InputError(f"{where}: .npy format version {version} is not supported; save "
                             "it again with numpy's np.save or np.savez")
        shape, fortran, dtype = read(f)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise InputError(f"{where} is not a readable .npy array ({e})") from None
    _check_dtype(dtype, where)
    return tuple(shape), fortran, dtype


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.hasobject:
        raise InputError(f"{where} holds Python objects (dtype object), not numbers: it would "
                         "have to be unpickled, which hmf-device never does; save a float32 "
                         "array")
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        raise InputError(f"{where} holds {dtype} values, not numbers: save the samples as a "
                         "float32 array (uint8 for images)")


def _load_npy(path: Path) -> np.ndarray | ArrayFile:
    with open(path, "rb") as f:
        shape, fortran, dtype = _header(f, str(path))
        offset = f.tell()
    size = path.stat().st_size
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need:
        raise InputError(f"{path} is truncated: {size} bytes, its header promises {need}")
    if fortran or not shape:  # rows are not contiguous (or a scalar): read it whole
        return np.load(path, allow_pickle=False)
    return ArrayFile(path, offset, shape, dtype)


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's data starts: after its local header (whose name and extra field
    may differ in length from the central directory's)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != ZIP_MAGIC:
        raise InputError(f"{path}: a damaged .npz (bad local header of {info.filename})")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _npz_member(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray | ArrayFile:
    info = zf.getinfo(f"{key}.npy")
    where = f"{path}[{key}]"
    with zf.open(info) as f:
        shape, fortran, dtype = _header(f, where)
        header_len = f.tell()
    if info.file_size < header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        # checked before anything is allocated: a header may claim any shape
        raise InputError(f"{where} is truncated: its header promises shape {shape}")
    lazy = (info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1
            and not fortran and shape)
    if not lazy:  # compressed: it must be inflated, once, whole
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    return ArrayFile(path, _member_offset(path, info) + header_len, shape, dtype)


def _pick(names: list[str], key: str | None, path: Path) -> str:
    """The array holding the samples: ``--key``, else ``x``, else the only array besides y."""
    if key is not None:
        if key not in names:
            raise InputError(f"{path} has no array {key!r} (it has {', '.join(names)})")
        return key
    if "x" in names:
        return "x"
    others = [n for n in names if n != "y"]
    if len(others) != 1:
        raise InputError(f"{path} holds {', '.join(names)}: name the samples with --key")
    return others[0]


def _labels(path: Path, zf: zipfile.ZipFile, names: list[str], key: str) -> np.ndarray | None:
    if "y" not in names or key == "y":
        return None
    _header(zf.open("y.npy"), f"{path}[y]")  # refuses objects before np.load sees them
    with np.load(path, allow_pickle=False) as npz:
        return npz["y"]


def open_samples(path: str | Path, key: str | None = None
                 ) -> tuple[np.ndarray | ArrayFile, np.ndarray | None]:
    """(samples, labels or None) of a ``.npy`` (no labels) or ``.npz`` (``x`` or ``key``, and
    ``y``). Checks dtypes and integrity without reading the samples; InputError otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if magic.startswith(NPY_MAGIC):
            if key is not None:
                raise InputError(f"{path} is a .npy file (one array): --key is for .npz files")
            return _load_npy(path), None
        if not magic.startswith(b"PK"):  # a zip: an empty one starts with its end record
            raise InputError(f"{path} is neither a .npy nor a .npz file (numpy's np.save / "
                             "np.savez)")
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if not names:
                raise InputError(f"{path} holds no arrays: save the samples with "
                                 "np.savez(path, x=samples)")
            k = _pick(names, key, path)
            return _npz_member(path, zf, k), _labels(path, zf, names, k)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, struct.error) as e:
        raise InputError(f"cannot read {path}: {e}") from None
