"""Dataset loaders: each dataset read from the files of its official release, one small function
per format, in a registry keyed by model name (the names of ``common.models.SPECS``).

Nothing here downloads anything: a device or CI runner may have no network, and fetching hundreds
of MB behind the user's back is worse than a clear message. A missing or malformed file raises
:class:`DataError` naming the file expected, where it was looked for and where to get it.

Images come out NCHW float32 normalised to [-1, 1] ((v/255 - 0.5)/0.5, as the authors did);
accelerometer windows come out raw, float32 (N, 3, 151), as the authors fed UniMiB SHAR.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.models import SPECS

HAPT_FILE = "hapt_windows_acc151.npz"
SHIPPED_HAPT = Path(__file__).resolve().parent / "assets" / "hapt"  # default data, no download


class DataError(Exception):
    """A dataset file is missing or not in the expected format; the message says how to fix it."""


@dataclass
class Dataset:
    """A dataset in memory, each sample shaped as ``SPECS[name].input_shape``."""

    name: str
    x: np.ndarray  # float32 (N, *input_shape), normalised
    y: np.ndarray  # int64 (N,), 0..num_classes-1
    groups: np.ndarray | None  # int64 (N,) subject id per sample, or None
    test_x: np.ndarray | None  # the official test split where the dataset has one
    test_y: np.ndarray | None
    class_names: tuple[str, ...]


# name -> (label in messages, the files to get, the official page)
_ORIGIN = {
    "hapt": ("HAPT", HAPT_FILE, "https://archive.ics.uci.edu/dataset/341/"
             "smartphone+based+recognition+of+human+activities+and+postural+transitions"),
    "svhn": ("SVHN", "train_32x32.mat and test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/"),
    "stl10": ("STL-10", "stl10_binary.tar.gz (unpack it: stl10_binary/train_X.bin ...)",
              "https://cs.stanford.edu/~acoates/stl10/"),
    "cifar10": ("CIFAR-10", "the binary or python version (unpack it: cifar-10-batches-bin/ or "
                "cifar-10-batches-py/)", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "mnist": ("MNIST", "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (and the train-* "
              "files)", "http://yann.lecun.com/exdb/mnist/"),
    **{n: ("UniMiB SHAR", f"the dataset's {p}_data.mat and {p}_labels.mat",
           "http://www.sal.disco.unimib.it/technologies/unimib-shar/")
       for n, p in (("unimib", "fall"), ("unimib_adl", "adl"), ("unimib_full", "full"))},
}


def _error(name: str, msg: str) -> DataError:
    label, files, url = _ORIGIN[name]
    if name == "hapt":
        how = (f"Omit --data-dir to use the shipped copy, or pass --data-dir DIR holding {files} "
               f"(windows made from {url}; see common/assets/hapt/SOURCE.md)")
    else:
        how = f"Download {files} from {url} and pass --data-dir DIR"
    return DataError(f"{label}: {msg}. {how}")


def _need(name: str, path: Path) -> Path:
    if not path.is_file():
        raise _error(name, f"{path} not found")
    return path


@contextmanager
def _reading(name: str, path: Path) -> Iterator[None]:
    """Turns any failure while parsing ``path`` into a DataError that names the file."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        raise _error(name, f"cannot read {path}: {type(e).__name__}: {e}") from e


def _keys(name: str, path: Path, f: Any, *keys: str) -> list[np.ndarray]:
    missing = [k for k in keys if k not in f]
    if missing:
        raise _error(name, f"{path} lacks {', '.join(missing)} (expected keys {', '.join(keys)})")
    return [np.asarray(f[k]) for k in keys]


def _samples(name: str, path: Path | str, x: np.ndarray, y: np.ndarray,
             groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checks one split against the model's input shape and class count, then converts it."""
    spec, y = SPECS[name], np.asarray(y).reshape(-1)
    image = len(spec.input_shape) == 3
    if x.shape[1:] != spec.input_shape or len(x) != len(y):
        raise _error(name, f"{path}: expected samples of shape {spec.input_shape} and one label "
                     f"each, got data {x.shape} and labels {y.shape}")
    if image and x.dtype != np.uint8:
        raise _error(name, f"{path}: expected uint8 pixels, got {x.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise _error(name, f"{path}: labels must be 0..{spec.num_classes - 1} after mapping, "
                     f"found {y.min()}..{y.max()}")
    if groups is not None and np.shape(groups) != y.shape:
        raise _error(name, f"{path}: expected one subject id per sample, got {np.shape(groups)}")
    if image:  # in place: STL-10 as float32 is 0.5 GB per split, no need for temporaries
        out = x.astype(np.float32)
        out /= 255.0
        out -= 0.5
        out /= 0.5
    else:
        out = np.ascontiguousarray(x, dtype=np.float32)
    return out, y.astype(np.int64), None if groups is None else np.asarray(groups, np.int64)


def _loadmat(name: str, path: Path) -> dict[str, Any]:
    """The variables of a MATLAB file (not its ``__header__``-style entries)."""
    from scipy.io import loadmat  # lazy: devices never read .mat files and may lack scipy

    with _reading(name, _need(name, path)):
        return {k: v for k, v in loadmat(path).items() if not k.startswith("__")}


def _matvar(name: str, path: Path, key: str) -> np.ndarray:
    """Variable ``key`` of a MATLAB file, or its only variable if it is named otherwise."""
    m = _loadmat(name, path)
    if key not in m and len(m) != 1:
        raise _error(name, f"{path} has no variable {key!r} (has {', '.join(m) or 'none'})")
    return np.asarray(m[key] if key in m else next(iter(m.values())))


Split = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _hapt(name: str, d: Path | None) -> Split:
    path = _need(name, (SHIPPED_HAPT if d is None else d) / HAPT_FILE)
    with _reading(name, path), np.load(path) as f:
        x, y, g = _keys(name, path, f, "x", "y", "subject")
    return *_samples(name, path, x, y, g), None, None


def _svhn(name: str, d: Path) -> Split:
    out = []
    for path in (d / "train_32x32.mat", d / "test_32x32.mat"):
        x, y = _keys(name, path, _loadmat(name, path), "X", "y")
        if x.ndim != 4:
            raise _error(name, f"{path}: expected X of shape (32, 32, 3, N), got {x.shape}")
        out.append(_samples(name, path, x.transpose(3, 2, 0, 1), np.where(y == 10, 0, y)))
    return out[0][0], out[0][1], None, out[1][0], out[1][1]


def _stl10(name: str, d: Path) -> Split:
    """Each image is stored column-major, so read as (3, 96, 96) it is transposed: swap H, W."""
    base, out = d / "stl10_binary" if (d / "stl10_binary").is_dir() else d, []
    for split in ("train", "test"):
        xp, yp = _need(name, base / f"{split}_X.bin"), _need(name, base / f"{split}_y.bin")
        with _reading(name, xp):
            x = np.fromfile(xp, np.uint8)
        with _reading(name, yp):
            y = np.fromfile(yp, np.uint8).astype(np.int64) - 1  # labels 1..10
        if x.size % (3 * 96 * 96):
            raise _error(name, f"{xp}: {x.size} bytes is not a whole number of 3x96x96 images")
        out.append(_samples(name, xp, x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2), y))
    return out[0][0], out[0][1], None, out[1][0], out[1][1]


def _unimib(name: str, d: Path) -> Split:
    """One 453-value row per window: x[0:151], y[151:302], z[302:453] in m/s^2. Labels: column 0
    the class (1-based), column 1 the subject (1..30), column 2 the trial."""
    p = {"unimib": "fall", "unimib_adl": "adl", "unimib_full": "full"}[name]
    dp, lp = d / f"{p}_data.mat", d / f"{p}_labels.mat"
    data, labels = _matvar(name, dp, f"{p}_data"), _matvar(name, lp, f"{p}_labels")
    if data.ndim != 2 or data.shape[1] != 453:
        raise _error(name, f"{dp}: expected {p}_data of shape (N, 453), got {data.shape}")
    if labels.ndim != 2 or labels.shape[1] < 2:
        raise _error(name, f"{lp}: expected {p}_labels of shape (N, 3), got {labels.shape}")
    labels = labels.astype(np.int64)
    return *_samples(name, dp, data.reshape(-1, 3, 151), labels[:, 0] - 1, labels[:, 1]), None, None


def _array_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                           ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):  # the name depends on the numpy that pickled it
        allowed[mod + ".multiarray", "_reconstruct"] = _reconstruct
        allowed[mod + ".numeric", "_frombuffer"] = _frombuffer  # protocol 5
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Reads the official CIFAR-10 python batches without trusting them.

    A pickle is a program: ``pickle.load`` (and ``np.load(allow_pickle=True)``) calls whatever
    global the file names, ``os.system`` included, so a doctored ``data_batch_1`` would run code
    on the machine. The batches need only plain containers and numpy arrays, so any global other
    than numpy's array-reconstruction functions is refused before it can be called."""

    _allowed = _array_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[module, name]
        raise pickle.UnpicklingError(f"refused global {module}.{name}: a data file may only "
                                     "rebuild numpy arrays")


def _cifar_bin(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    with _reading(name, path):
        raw = np.fromfile(path, np.uint8)
    if raw.size % 3073:
        raise _error(name, f"{path}: {raw.size} bytes is not a whole number of 3073-byte records "
                     "(1 label byte + 3x32x32 pixels)")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0]


def _cifar_py(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    with _reading(name, path), open(path, "rb") as fh:
        batch = _ArrayUnpickler(fh, encoding="bytes").load()  # Python 2 str -> bytes
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _error(name, f"{path}: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _error(name, f"{path}: expected b'data' uint8 (N, 3072), got {data.dtype} "
                     f"{data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"])


def _cifar_jpeg(name: str, path: Path) -> Split:
    """All 60,000 images as JPEG bytes (``cifar10_jpeg.npz``, ../shared/data/cifar10/SOURCE.md);
    decoding needs Pillow, which matplotlib (the cloud install) already brings."""
    try:
        from PIL import Image  # lazy: only this format needs it
    except ImportError:
        raise _error(name, f"{path} holds JPEGs and decoding them needs Pillow "
                     "(pip install pillow)") from None
    import io

    with _reading(name, path), np.load(path) as f:
        data, off, y, split = _keys(name, path, f, "jpeg_bytes", "jpeg_offsets", "label", "split")
        if len(off) != len(y) + 1 or split.shape != y.shape:
            raise _error(name, f"{path}: expected len(jpeg_offsets) == len(label) + 1 == "
                         f"len(split) + 1, got {len(off)}, {len(y)}, {len(split)}")
        x = np.stack([np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())).convert("RGB"))
                      for a, b in zip(off[:-1], off[1:], strict=True)])
    x = x.transpose(0, 3, 1, 2)
    (tr, ytr, _), (te, yte, _) = (_samples(name, path, x[split == s], y[split == s])
                                  for s in (0, 1))
    return tr, ytr, None, te, yte


def _cifar10(name: str, d: Path) -> Split:
    """The official binary, else the python version, else ``cifar10_jpeg.npz`` (all 60,000
    images as JPEGs), else ``cifar10_small_uint8.npz`` (a 10,000/2,000 NHWC subset)."""
    for sub, ext, read in (("cifar-10-batches-bin", ".bin", _cifar_bin),
                           ("cifar-10-batches-py", "", _cifar_py)):
        base = next((b for b in (d / sub, d) if (b / f"data_batch_1{ext}").is_file()), None)
        if base is not None:
            parts = [read(name, _need(name, base / f"data_batch_{i}{ext}")) for i in range(1, 6)]
            x, y, _ = _samples(name, base, np.concatenate([p[0] for p in parts]),
                               np.concatenate([p[1] for p in parts]))
            tp = _need(name, base / f"test_batch{ext}")
            tx, ty, _ = _samples(name, tp, *read(name, tp))
            return x, y, None, tx, ty
    if (d / "cifar10_jpeg.npz").is_file():
        return _cifar_jpeg(name, d / "cifar10_jpeg.npz")
    npz = d / "cifar10_small_uint8.npz"
    if npz.is_file():
        with _reading(name, npz), np.load(npz) as f:
            x, y, tx, ty = _keys(name, npz, f, "x_train", "y_train", "x_test", "y_test")
            x, tx = x.transpose(0, 3, 1, 2), tx.transpose(0, 3, 1, 2)
        (x, y, _), (tx, ty, _) = _samples(name, npz, x, y), _samples(name, npz, tx, ty)
        return x, y, None, tx, ty
    raise _error(name, f"none of cifar-10-batches-bin/data_batch_1.bin, cifar-10-batches-py/"
                 f"data_batch_1, cifar10_jpeg.npz, cifar10_small_uint8.npz found in {d}")


def _idx(name: str, path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (MNIST's format): 0, 0, 0x08, ndim, big-endian dims, data."""
    with _reading(name, path), (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3] if len(raw) >= 4 and raw[:3] == b"\0\0\x08" else 0
    dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, 4)) if ndim else ()
    if not ndim or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise _error(name, f"{path} is not an idx file of unsigned bytes")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _stratified(y: np.ndarray, every: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split sending every ``every``-th sample of each class (in random order) to test:
    10,000 samples -> 8,000 / 2,000 with class proportions kept to within one sample."""
    perm = np.random.default_rng(seed).permutation(len(y))
    test = np.zeros(len(y), bool)
    test[perm[np.argsort(y[perm], kind="stable")][::every]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def _mnist(name: str, d: Path) -> Split:
    """Official train/test from the idx files when the train files are there. Otherwise only the
    official *test* set exists offline (``mnist_t10k.npz`` or the t10k idx files), and it is split
    8000/2000, stratified, seed 0, into this dataset's train and test."""
    def idx(stem: str) -> Path | None:
        return next((d / n for n in (stem, stem + ".gz") if (d / n).is_file()), None)

    tr = idx("train-images-idx3-ubyte"), idx("train-labels-idx1-ubyte")
    te = idx("t10k-images-idx3-ubyte"), idx("t10k-labels-idx1-ubyte")
    if all(tr) and all(te):
        (x, y, _), (tx, ty, _) = (_samples(name, i, _idx(name, i)[:, None], _idx(name, lb))
                                  for i, lb in (tr, te))
        return x, y, None, tx, ty
    npz = d / "mnist_t10k.npz"
    if npz.is_file():
        with _reading(name, npz), np.load(npz) as f:
            x, y = _keys(name, npz, f, "x", "y")
        path = npz
    elif all(te):
        path, x, y = te[0], _idx(name, te[0]), _idx(name, te[1])
    else:
        raise _error(name, f"neither {npz} nor t10k-images-idx3-ubyte[.gz] + "
                     f"t10k-labels-idx1-ubyte[.gz] found in {d}")
    x, y, _ = _samples(name, path, x[:, None] if x.ndim == 3 else x, y)
    train, test = _stratified(y)
    return x[train], y[train], None, x[test], y[test]


_LOADERS: dict[str, Callable[[str, Any], Split]] = {
    "hapt": _hapt, "svhn": _svhn, "stl10": _stl10, "cifar10": _cifar10, "mnist": _mnist,
    "unimib": _unimib, "unimib_adl": _unimib, "unimib_full": _unimib,
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads dataset ``name`` from ``data_dir`` (``hapt`` without one: the shipped copy).

    ``test_x``/``test_y`` hold the official test split where the dataset has one (SVHN, STL-10,
    CIFAR-10, MNIST). MNIST with only its official test set (all there is offline) is split
    8000/2000 into train and test instead. ``groups`` is the subject id (HAPT, UniMiB SHAR).
    Raises DataError, naming the file and where to get it, when the data is missing or malformed.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(_LOADERS)}")
    if data_dir is None and name != "hapt":
        raise _error(name, "no data directory given")
    d = None if data_dir is None else Path(data_dir).expanduser()
    x, y, groups, test_x, test_y = _LOADERS[name](name, d)
    return Dataset(name, x, y, groups, test_x, test_y, SPECS[name].class_names)
