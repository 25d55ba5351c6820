"""Samples for the export's checks, int8 calibration and the accuracy columns.

Real data wherever we have it: the shipped HAPT windows for ``hapt`` (no download), or a dataset
directory the user points at. Calibration draws from the training side and accuracy from the
test side, so the int8 accuracy is not measured on the data that set its ranges. Without data, a
seeded random-normal stand-in keeps parity checks and calibration possible, and the samples say
they are synthetic so that no accuracy is reported from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import load_dataset
from common.models import SPECS

# The volunteers UCI HAR / HAPT put in their official test set (the rest is the training set).
HAPT_TEST_SUBJECTS = (2, 4, 9, 10, 12, 13, 18, 20, 24)


@dataclass(frozen=True)
class Samples:
    """Inputs as the exported graph takes them (normalised), labels where real."""

    x: np.ndarray  # float32 (N, *input_shape)
    y: np.ndarray | None  # int64 (N,); None for synthetic data
    source: str  # where they come from, written into the manifest

    @property
    def real(self) -> bool:
        return self.y is not None

    def head(self, n: int) -> Samples:
        return Samples(self.x[:n], None if self.y is None else self.y[:n], self.source)


@dataclass(frozen=True)
class ExportData:
    """Calibration samples (training side) and evaluation samples (test side)."""

    calibration: Samples
    evaluation: Samples


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """A seeded random subset of ``n`` samples (all of them if ``n`` is None or larger), in a
    fixed order so that manifests are reproducible."""
    if n is None or n >= len(x):
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[keep], y[keep]


def hapt_split(data_dir: str | Path | None = None) -> tuple[tuple[np.ndarray, np.ndarray],
                                                            tuple[np.ndarray, np.ndarray]]:
    """HAPT windows split by volunteer as UCI did: ((train x, y), (test x, y))."""
    d = load_dataset("hapt", data_dir)
    test = np.isin(d.groups, HAPT_TEST_SUBJECTS)
    return (d.x[~test], d.y[~test]), (d.x[test], d.y[test])


def synthetic(name: str, n: int, seed: int) -> Samples:
    """Seeded standard-normal inputs of the model's input shape (no labels)."""
    shape = SPECS[name].input_shape
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    return Samples(x, None, f"synthetic: standard normal, seed {seed}")


def export_data(name: str, data_dir: str | Path | None, *, calibration: int = 256,
                evaluation: int | None = 2000, seed: int = 0) -> ExportData:
    """The samples for ``name``: HAPT's shipped windows, ``data_dir``'s dataset, or synthetic.

    ``evaluation`` caps the test samples (None: all), because accuracy at every exit and both
    precisions on STL-10's full test set takes minutes on a small CPU.
    """
    if name == "hapt":
        (tx, ty), (ex, ey) = hapt_split(data_dir)
        cal_src = "hapt: shipped windows, UCI training volunteers"
        eval_src = f"hapt: shipped windows, UCI test volunteers {list(HAPT_TEST_SUBJECTS)}"
    elif data_dir is not None:
        d = load_dataset(name, data_dir)
        tx, ty = d.x, d.y
        if d.test_x is not None:
            ex, ey, eval_src = d.test_x, d.test_y, f"{name}: official test split"
        else:  # no official test split: hold out a seeded fifth
            order = np.random.default_rng(seed).permutation(len(tx))
            cut = len(tx) // 5
            ex, ey, tx, ty = tx[order[:cut]], ty[order[:cut]], tx[order[cut:]], ty[order[cut:]]
            eval_src = f"{name}: a seeded fifth held out from calibration"
        cal_src = f"{name}: training samples"
    else:
        return ExportData(synthetic(name, calibration, seed), synthetic(name, 64, seed + 1))
    cx, cy = _subset(tx, ty, calibration, seed)
    ex, ey = _subset(ex, ey, evaluation, seed + 1)
    return ExportData(Samples(cx, cy, cal_src), Samples(ex, ey, eval_src))
