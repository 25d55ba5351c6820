"""Loaders against small files written in each dataset's real on-disk format, checked value by
value against an independent computation, plus the shipped HAPT windows."""

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from common.data import DataError, load_dataset


def norm(v):
    """The normalisation the loaders promise, in float64."""
    return (v / 255 - 0.5) / 0.5


def px(v: int):
    return pytest.approx(norm(v), abs=1e-6)  # the loaders compute in float32


def test_shipped_hapt():
    d = load_dataset("hapt")
    assert d.x.shape == (8693, 3, 151) and d.x.dtype == np.float32 and d.y.dtype == np.int64
    assert np.bincount(d.y).tolist() == [1435, 1282, 1162, 1510, 1658, 1646]
    assert d.groups.dtype == np.int64 and np.unique(d.groups).tolist() == list(range(1, 31))
    assert d.test_x is None and d.test_y is None and d.class_names[0] == "WALKING"
    assert -1.9 < d.x.min() < d.x.max() < 2.01  # raw g, not normalised


def test_hapt_from_dir_and_missing(tiny_hapt, tmp_path):
    d = load_dataset("hapt", tiny_hapt)
    assert d.x.shape == (360, 3, 151) and np.bincount(d.y).tolist() == [60] * 6
    with pytest.raises(DataError, match=f"{tmp_path}/hapt_windows_acc151.npz not found"):
        load_dataset("hapt", tmp_path)


def test_svhn(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("test", 3)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        X[4, 7, 2, 1] = 200  # row 4, column 7, blue, image 1
        y = np.array([[10], [1], [9], [10], [3]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y})
        if split == "train":
            train_X = X
    d = load_dataset("svhn", tmp_path)
    assert d.x.shape == (5, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.x[1, 2, 4, 7] == px(200)
    for n, c, h, w in ((0, 0, 0, 0), (3, 1, 31, 5), (4, 2, 17, 30)):
        assert d.x[n, c, h, w] == px(int(train_X[h, w, c, n]))
    assert d.y.tolist() == [0, 1, 9, 0, 3] and d.test_y.tolist() == [0, 1, 9]


def test_svhn_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="train_32x32.mat not found.*ufldl.stanford.edu"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn")
    savemat(tmp_path / "train_32x32.mat", {"images": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataError, match="train_32x32.mat lacks X, y"):
        load_dataset("svhn", tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="cannot read .*train_32x32.mat"):
        load_dataset("svhn", tmp_path)


def test_stl10_column_major(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "stl10_binary"
    base.mkdir()
    imgs = {}
    for split, n in (("train", 3), ("test", 2)):
        img = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W), true layout
        img[0, 1] = 0
        img[0, 1, 5, 40] = 255  # row 5, column 40 of the green plane
        # the release writes each plane in column-major (Fortran) order
        raw = b"".join(img[i, c].tobytes(order="F") for i in range(n) for c in range(3))
        (base / f"{split}_X.bin").write_bytes(raw)
        (base / f"{split}_y.bin").write_bytes(bytes([1, 10, 4][:n]))
        imgs[split] = img
    d = load_dataset("stl10", tmp_path)
    assert d.x.shape == (3, 3, 96, 96) and d.test_x.shape == (2, 3, 96, 96)
    assert d.x[0, 1, 5, 40] == 1.0 and d.x[0, 1, 40, 5] == -1.0
    assert d.x[2, 0, 90, 3] == px(int(imgs["train"][2, 0, 90, 3]))
    assert d.test_x[1, 2, 7, 60] == px(int(imgs["test"][1, 2, 7, 60]))
    assert d.y.tolist() == [0, 9, 3] and d.test_y.tolist() == [0, 9]
    (base / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="test_X.bin: 100 bytes"):
        load_dataset("stl10", tmp_path)


def cifar_images(rng, n):
    img = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return img, rng.integers(0, 10, n)


def test_cifar_binary(tmp_path):
    rng = np.random.default_rng(3)
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    batches = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        img, lab = cifar_images(rng, 2)
        rec = b""
        for i in range(2):  # 1 label byte, then the red, green and blue planes, each row-major
            rec += bytes([lab[i]]) + b"".join(
                bytes(int(img[i, c, h, w]) for h in range(32) for w in range(32))
                for c in range(3))
        (base / f"{f}.bin").write_bytes(rec)
        batches[f] = img, lab
    d = load_dataset("cifar10", tmp_path)
    assert d.x.shape == (10, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    img3, lab3 = batches["data_batch_3"]
    assert d.x[5, 2, 31, 0] == px(int(img3[1, 2, 31, 0]))
    assert d.y[5] == lab3[1] and d.test_y.tolist() == batches["test_batch"][1].tolist()
    (base / "test_batch.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(DataError, match="test_batch.bin: 3000 bytes"):
        load_dataset("cifar10", tmp_path)
    (base / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match="data_batch_4.bin not found.*toronto"):
        load_dataset("cifar10", tmp_path)


class Py2Pickler(pickle._Pickler):
    """Writes strings as Python 2 ``str`` (BINSTRING), as the official python batches hold them."""

    def save_bytes(self, obj):
        op = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else \
            pickle.BINSTRING + struct.pack("<i", len(obj))
        self.write(op + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes, str: save_str}


def py2_dumps(obj) -> bytes:
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@pytest.mark.parametrize("dumps", [lambda o: pickle.dumps(o, protocol=4),
                                   lambda o: pickle.dumps(o, protocol=5), py2_dumps])
def test_cifar_python(tmp_path, dumps):
    rng = np.random.default_rng(4)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        img, lab = cifar_images(rng, 3)
        batch = {b"batch_label": b"x", b"data": img.reshape(3, 3072), b"labels": lab.tolist()}
        (base / f).write_bytes(dumps(batch))
        batches[f] = img, lab
    d = load_dataset("cifar10", tmp_path)
    assert d.x.shape == (15, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    img5, lab5 = batches["data_batch_5"]
    assert d.x[14, 1, 3, 30] == px(int(img5[2, 1, 3, 30]))
    assert d.y[12:].tolist() == lab5.tolist()
    assert d.test_x[0, 0, 0, 0] == px(int(batches["test_batch"][0][0, 0, 0, 0]))


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_python_refuses_code(tmp_path):
    base, marker = tmp_path / "cifar-10-batches-py", tmp_path / "pwned"
    base.mkdir()
    payload = pickle.dumps({b"data": Evil(marker), b"labels": [0]})
    assert b"system" in payload
    (base / "data_batch_1").write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_1.*refused global \w+\.system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_npz(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)  # NHWC
    tx = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10_small_uint8.npz", x_train=x, y_train=np.uint8([0, 1, 2, 9]),
             x_test=tx, y_test=np.uint8([5, 6]))
    d = load_dataset("cifar10", tmp_path)
    assert d.x.shape == (4, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    assert d.x[3, 2, 10, 20] == px(int(x[3, 10, 20, 2]))
    assert d.test_x[1, 0, 31, 1] == px(int(tx[1, 31, 1, 0]))
    assert d.y.tolist() == [0, 1, 2, 9] and d.test_y.tolist() == [5, 6]
    np.savez(tmp_path / "cifar10_small_uint8.npz", x_train=x)
    with pytest.raises(DataError, match="cifar10_small_uint8.npz lacks y_train, x_test, y_test"):
        load_dataset("cifar10", tmp_path)


def test_cifar_nothing_there(tmp_path):
    with pytest.raises(DataError, match=f"none of .* found in {tmp_path}"):
        load_dataset("cifar10", tmp_path)


def unique_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel (0, 0) is their own index, so every loaded image can be traced back."""
    x = np.random.default_rng(6).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n)
    return x, np.arange(n, dtype=np.uint8) % 10


def check_traced(d, x, y):
    for xs, ys in ((d.x, d.y), (d.test_x, d.test_y)):
        src = np.rint((xs[:, 0, 0, 0] * 0.5 + 0.5) * 255).astype(int)
        assert np.allclose(xs[:, 0], norm(x[src].astype(np.float64)), atol=1e-6)
        assert ys.tolist() == y[src].tolist()


def test_mnist_npz_stratified_split(tmp_path):
    x, y = unique_digits(50)
    np.savez(tmp_path / "mnist_t10k.npz", x=x, y=y)
    d = load_dataset("mnist", tmp_path)
    assert d.x.shape == (40, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)
    assert np.bincount(d.test_y).tolist() == [1] * 10 and np.bincount(d.y).tolist() == [4] * 10
    check_traced(d, x, y)
    e = load_dataset("mnist", tmp_path)
    assert np.array_equal(d.x, e.x) and np.array_equal(d.test_y, e.test_y)
    train_ids = {int(v) for v in np.rint((d.x[:, 0, 0, 0] * 0.5 + 0.5) * 255)}
    test_ids = {int(v) for v in np.rint((d.test_x[:, 0, 0, 0] * 0.5 + 0.5) * 255)}
    assert train_ids | test_ids == set(range(50)) and not train_ids & test_ids


def write_idx(path: Path, arr: np.ndarray) -> None:
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def test_mnist_idx(tmp_path):
    x, y = unique_digits(30)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y)
    d = load_dataset("mnist", tmp_path)  # test set only: split 24/6
    assert len(d.x) == 24 and len(d.test_x) == 6
    check_traced(d, x, y)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[:20])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y[:20])
    d = load_dataset("mnist", tmp_path)  # official train / test
    assert len(d.x) == 20 and len(d.test_x) == 30
    assert d.x[7, 0, 3, 9] == px(int(x[7, 3, 9]))
    assert d.test_y.tolist() == y.tolist()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x09\x01junk")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an idx file"):
        load_dataset("mnist", tmp_path)


def test_mnist_missing(tmp_path):
    with pytest.raises(DataError, match="mnist_t10k.npz nor t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)


def test_unimib(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.normal(0, 9.8, (6, 453))
    labels = np.array([[1, 3, 1], [8, 3, 2], [2, 30, 1], [5, 1, 1], [3, 7, 1], [4, 7, 2]],
                      dtype=np.float64)
    savemat(tmp_path / "fall_data.mat", {"fall_data": data})
    savemat(tmp_path / "fall_labels.mat", {"fall_labels": labels})
    d = load_dataset("unimib", tmp_path)
    assert d.x.shape == (6, 3, 151) and d.x.dtype == np.float32
    for n, axis, t in ((0, 0, 0), (1, 1, 5), (5, 2, 150)):
        assert d.x[n, axis, t] == pytest.approx(data[n, 151 * axis + t], rel=1e-6)
    assert d.y.tolist() == [0, 7, 1, 4, 2, 3] and d.groups.tolist() == [3, 3, 30, 1, 7, 7]
    assert d.test_x is None and len(d.class_names) == 8
    # a variable named otherwise is found when it is the only one
    savemat(tmp_path / "full_data.mat", {"data": data})
    full = labels + np.array([[9, 0, 0]] * 2 + [[0, 0, 0]] * 4)  # falls are classes 10..17
    savemat(tmp_path / "full_labels.mat", {"labels": full})
    d = load_dataset("unimib_full", tmp_path)
    assert d.y.tolist() == [9, 16, 1, 4, 2, 3]
    savemat(tmp_path / "adl_data.mat", {"adl_data": data[:, :400]})
    savemat(tmp_path / "adl_labels.mat", {"adl_labels": labels})
    with pytest.raises(DataError, match=r"adl_data.mat: expected adl_data of shape \(N, 453\)"):
        load_dataset("unimib_adl", tmp_path)
    savemat(tmp_path / "fall_labels.mat", {"fall_labels": labels + 1})  # class 9 of 8
    with pytest.raises(DataError, match="fall_data.mat: labels must be 0..7"):
        load_dataset("unimib", tmp_path)
    savemat(tmp_path / "fall_labels.mat", {"a": labels, "b": labels})
    with pytest.raises(DataError, match="fall_labels.mat has no variable 'fall_labels'.*unimib"):
        load_dataset("unimib", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "/tmp")


def test_cifar_jpeg_npz(tmp_path):
    """The 60,000-JPEG container: split 0 is train, 1 test; each image decoded in place. Flat
    colours survive JPEG to within a couple of levels, so the decoded pixels are checkable."""
    from PIL import Image

    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (128, 64, 32)]
    blobs = []
    for c in colours:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), c).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(tmp_path / "cifar10_jpeg.npz", jpeg_bytes=np.concatenate(blobs),
             jpeg_offsets=offsets, label=np.array([3, 1, 7, 9], np.uint8),
             split=np.array([0, 1, 0, 1], np.uint8))
    d = load_dataset("cifar10", tmp_path)
    assert d.x.shape == (2, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    assert d.y.tolist() == [3, 7] and d.test_y.tolist() == [1, 9]
    expected = np.array([norm(v) for v in colours[2]])  # train image 1: container image 3
    assert np.abs(d.x[1, :, 16, 16] - expected).max() < 4 / 127.5
    np.savez(tmp_path / "cifar10_jpeg.npz", jpeg_bytes=np.concatenate(blobs),
             jpeg_offsets=offsets[:-1], label=np.array([3, 1, 7, 9], np.uint8),
             split=np.array([0, 1, 0, 1], np.uint8))
    with pytest.raises(DataError, match="jpeg_offsets"):
        load_dataset("cifar10", tmp_path)
