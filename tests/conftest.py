from pathlib import Path

import numpy as np
import pytest

from common.data import load_dataset


@pytest.fixture(scope="session")
def tiny_hapt(tmp_path_factory) -> Path:
    """A directory holding a 360-window slice of the shipped HAPT windows (60 per class), in the
    shipped file's format: real data, small enough for seconds-long federated rounds."""
    data = load_dataset("hapt")
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(data.y == c), 60, replace=False)
                                   for c in range(6)]))
    d = tmp_path_factory.mktemp("tiny_hapt")
    np.savez(d / "hapt_windows_acc151.npz", x=data.x[keep], y=data.y[keep].astype(np.int8),
             subject=data.groups[keep].astype(np.int8),
             class_names=np.array(data.class_names))
    return d
