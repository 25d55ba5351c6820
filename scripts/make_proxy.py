"""Builds the unlabelled proxy data of server-side distillation (``cloud/distillation.py``):
inputs no client trains on and no evaluation scores, from the offline copies in ../shared/data.

    python scripts/make_proxy.py hapt      # -> common/assets/hapt/hapt_proxy_windows.npz
    python scripts/make_proxy.py cifar10 --out runs/proxy/cifar10_proxy.npz

hapt: windows cut, as the dataset's own (151 samples, stride 75, accelerometer in g), from the
stretches of HAPT's raw recordings that carry none of the six activity labels: the unlabelled
samples between activities and the postural transitions (stand-to-sit ...). Every dataset window
lies wholly inside one labelled segment of the six activities, so no proxy window shares a sample
with any client's or the evaluation's data. They are the same 30 people on other seconds of the
same recordings, and the stretches are harder than the labelled ones (people move between
activities): what a deployment collecting raw, unlabelled sensor data would have.

hapt-noise: what a deployment without any proxy data can still make: Gaussian windows with the
per-axis mean and standard deviation of the clients' windows (statistics a fleet already
shares: the first BatchNorm layer's, under static BN), independent per sample.

cifar10: official training images the cpu-scale subset (``cifar10_small_uint8.npz``: the first
1,000 of each class in file order) does not contain: the last ``--per-class`` of each class,
from ``cifar10_jpeg.npz``. The full scale gives clients all 50,000 training images, so this
proxy overlaps its clients' data: hold a slice out before using it there.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WINDOW, STRIDE = 151, 75
ACTIVITIES = range(1, 7)  # the labels of the dataset's windows (1..6); 7..12 are transitions


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def hapt_proxy(raw: Path) -> dict[str, np.ndarray]:
    with np.load(raw) as f:
        acc, label, off = f["acc"], f["label"], f["exp_offsets"]
        user, exp_id = f["exp_user"], f["exp_id"]
    xs, subject, exp, start = [], [], [], []
    for e in range(len(user)):
        a, b = int(off[e]), int(off[e + 1])
        free = ~np.isin(label[a:b], ACTIVITIES)  # unlabelled or a transition
        for s, t in _runs(free):
            for w in range(s, t - WINDOW + 1, STRIDE):
                xs.append(acc[a + w : a + w + WINDOW].T)
                subject.append(int(user[e]))
                exp.append(int(exp_id[e]))
                start.append(w)  # as the dataset's windows: the row inside the experiment
    return dict(x=np.stack(xs).astype(np.float32), subject=np.array(subject, np.int8),
                exp_id=np.array(exp, np.int8), start=np.array(start, np.int32))


def hapt_noise_proxy(windows: Path, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    with np.load(windows) as f:
        x = f["x"]
    mean, std = x.mean(axis=(0, 2)), x.std(axis=(0, 2))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((count, 3, WINDOW)) * std[:, None] + mean[:, None]
    return dict(x=noise.astype(np.float32), mean=mean, std=std)


def cifar10_proxy(jpeg: Path, per_class: int) -> dict[str, np.ndarray]:
    from PIL import Image

    with np.load(jpeg) as f:
        data, off, y, split = f["jpeg_bytes"], f["jpeg_offsets"], f["label"], f["split"]
    picked = []
    for c in range(10):
        idx = np.flatnonzero((split == 0) & (y == c))
        picked += idx[-per_class:].tolist()  # the subset holds each class's first 1,000
    x = np.stack([np.asarray(Image.open(io.BytesIO(data[off[i]:off[i + 1]].tobytes()))
                             .convert("RGB")) for i in picked])
    return dict(x=x.transpose(0, 3, 1, 2).copy(), index=np.array(picked, np.int64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dataset", choices=("hapt", "hapt-noise", "cifar10"))
    p.add_argument("--source", type=Path, help="the raw file (default: ../shared/data/...)")
    p.add_argument("--per-class", type=int, default=500, help="cifar10: images per class")
    p.add_argument("--count", type=int, default=1024, help="hapt-noise: windows")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.dataset == "hapt":
        arrays = hapt_proxy(a.source or SHARED / "hapt" / "hapt_raw_streams.npz")
        out = a.out or ROOT / "common" / "assets" / "hapt" / "hapt_proxy_windows.npz"
    elif a.dataset == "hapt-noise":
        arrays = hapt_noise_proxy(ROOT / "common" / "assets" / "hapt" / "hapt_windows_acc151.npz",
                                  a.count)
        out = a.out or ROOT / "runs" / "proxy" / "hapt_noise_proxy.npz"
    else:
        arrays = cifar10_proxy(a.source or SHARED / "cifar10" / "cifar10_jpeg.npz", a.per_class)
        out = a.out or ROOT / "runs" / "proxy" / "cifar10_proxy.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {len(arrays['x'])} proxy inputs of shape {arrays['x'].shape[1:]}, "
          f"{out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
