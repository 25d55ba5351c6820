"""The device install stays slim: a fresh virtual environment with requirements-device.txt alone
(no onnx, scipy or matplotlib) runs `hmf-device profile` and `predict` on an exported model.

Creating the environment takes about half a minute (torch's wheel is the bulk), so it is kept
under pytest's cache directory and reused while requirements-device.txt, pyproject.toml, the
Python version and the checkout's path are unchanged.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.models import build_model
from export.data import export_data, hapt_split
from export.exporter import export_onnx

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-device.txt"


def _env() -> dict[str, str]:
    """This process's environment without anything that would leak the dev venv's packages."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}


def _run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(),
                         timeout=900, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _create(venv: Path) -> None:
    _run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    _run(pip, "install", "-q", "-r", REQUIREMENTS)
    _run(pip, "install", "-q", "--no-deps", "-e", ROOT)  # gives the hmf-device console script
    (venv / ".complete").touch()


@pytest.fixture(scope="module")
def slim_venv(request, tmp_path_factory) -> Path:
    key = hashlib.sha256(b"\0".join([REQUIREMENTS.read_bytes(),
                                     (ROOT / "pyproject.toml").read_bytes(),
                                     sys.version.encode(), str(ROOT).encode()])).hexdigest()
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir("hmf-slim-venv") if cache else tmp_path_factory.mktemp("slim")
    venv = base / key[:16]
    if not (venv / ".complete").exists():
        for old in base.iterdir():  # stale environments of other keys, or a half-built one
            shutil.rmtree(old, ignore_errors=True)
        _create(venv)
    return venv


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    state = build_model("hapt").state_dict()
    out = tmp_path_factory.mktemp("slim_onnx")
    export_onnx("hapt", state, out, export_data("hapt", None, calibration=16, evaluation=32),
                quantize="int8")
    return out, state


def test_slim_environment_has_no_export_or_cloud_dependencies(slim_venv):
    py = slim_venv / "bin" / "python"
    for module in ("onnx", "scipy", "matplotlib"):
        res = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True,
                             env=_env())
        assert res.returncode != 0, f"{module} is installed in the device environment"
    _run(py, "-c", "import onnxruntime, numpy, click, torch, paho.mqtt.client")


def test_hmf_device_profile_and_predict_in_the_slim_environment(slim_venv, exported, tmp_path):
    model_dir, state = exported
    cli = slim_venv / "bin" / "hmf-device"
    prof = json.loads(_run(cli, "profile", "--model-dir", model_dir, "--runs", "3",
                           "--budget-ms", "100000", "--json").stdout)
    assert [e["exit"] for e in prof["exits"]] == [1, 2, 3]
    assert prof["deepest_tier_within_budget"] == 3
    assert all(e["median_ms"] > 0 for e in prof["exits"])

    _, (x, y) = hapt_split()
    x, y = x[:16], y[:16]
    np.savez(tmp_path / "in.npz", x=x, y=y)
    model = build_model("hapt")
    model.load_state_dict(state)
    with torch.no_grad():
        ref = [z.numpy() for z in model.eval()(torch.from_numpy(x))]
    for args, k in ((["--exit", "2"], 2), (["--precision", "int8", "--exit", "1"], None)):
        res = json.loads(_run(cli, "predict", "--model-dir", model_dir, "--input",
                              tmp_path / "in.npz", *args, "--json").stdout)
        assert len(res["predictions"]) == 16 and "accuracy" in res["summary"]
        if k is not None:
            assert [p["label"] for p in res["predictions"]] == ref[k - 1].argmax(1).tolist()
    cascade = _run(cli, "predict", "--model-dir", model_dir, "--input", tmp_path / "in.npz",
                   "--threshold", "0.5").stdout
    assert "16 samples" in cascade
