"""The device installs stay slim, in fresh virtual environments built from the device files alone.

- serve-only (``scripts/install-device.sh --serve-only``: requirements-device-serve.txt): no
  torch, onnx, scipy or matplotlib; ``hmf-device profile`` and ``predict`` run on a real export,
  and ``hmf-device join`` refuses with a message that says how to get torch.
- full (requirements-device.txt: the same plus torch): the training path that ``join`` runs
  imports nothing beyond it, and trains.

Building them takes about 15 s and 40 s here (torch's wheel is the bulk), so each is kept under
pytest's cache directory and reused while its requirement files, the install script,
pyproject.toml, the Python version and the checkout's path are unchanged.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from common.models import build_model
from export.data import export_data, hapt_split
from export.exporter import Int8Policy, export_onnx

ROOT = Path(__file__).resolve().parents[1]
SERVE_REQUIREMENTS = ROOT / "requirements-device-serve.txt"
REQUIREMENTS = ROOT / "requirements-device.txt"
INSTALL = ROOT / "scripts" / "install-device.sh"
NOT_ON_A_BOARD = ("onnx", "scipy", "matplotlib")  # export and cloud only


def _env() -> dict[str, str]:
    """This process's environment without anything that would leak the dev venv's packages."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}


def _run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(),
                         timeout=900, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _importable(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                          env=_env()).returncode == 0


def _cached_venv(request, tmp_path_factory, kind: str, inputs: list[Path],
                 create: Callable[[Path], None]) -> Path:
    """A venv built by ``create``, kept in pytest's cache under a key of its inputs' content."""
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in inputs),
                                     (ROOT / "pyproject.toml").read_bytes(),
                                     sys.version.encode(), str(ROOT).encode()])).hexdigest()
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir(f"hmf-device-venv-{kind}") if cache else tmp_path_factory.mktemp(kind)
    venv = base / key[:16]
    if not (venv / ".complete").exists():
        for old in base.iterdir():  # stale environments of other keys, or a half-built one
            shutil.rmtree(old, ignore_errors=True)
        create(venv)
        (venv / ".complete").touch()
    return venv


def _create_serve_only(venv: Path) -> None:
    # The documented install itself, for real: its checks, pip lines and smoke test.
    _run("bash", INSTALL, "--serve-only", "--venv", venv, "--python", sys.executable)


def _create_full(venv: Path) -> None:
    # The script's torch step needs download.pytorch.org; here pip takes the local CPU wheel.
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "pip", "install", "-q", "-r", REQUIREMENTS)
    _run(venv / "bin" / "pip", "install", "-q", "--no-deps", "-e", ROOT)


LOOSE = Int8Policy(min_agreement=0.0, max_drop=1.0)


@pytest.fixture(scope="module")
def serve_venv(request, tmp_path_factory) -> Path:
    return _cached_venv(request, tmp_path_factory, "serve",
                        [SERVE_REQUIREMENTS, INSTALL], _create_serve_only)


@pytest.fixture(scope="module")
def full_venv(request, tmp_path_factory) -> Path:
    return _cached_venv(request, tmp_path_factory, "full",
                        [SERVE_REQUIREMENTS, REQUIREMENTS], _create_full)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    state = build_model("hapt").state_dict()
    out = tmp_path_factory.mktemp("slim_onnx")
    export_onnx("hapt", state, out, export_data("hapt", None, calibration=16, evaluation=32),
                quantize="int8",
                int8=LOOSE)  # every int8 graph ships, on any CPU: these tests run them
    return out, state


def _site_packages_mb(venv: Path) -> float:
    site = next((venv / "lib").glob("python3*/site-packages"))
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6


def test_serve_only_environment_has_no_torch_nor_export_or_cloud_dependencies(serve_venv):
    py = serve_venv / "bin" / "python"
    for module in (*NOT_ON_A_BOARD, "torch"):
        assert not _importable(py, module), f"{module} is installed in the serve-only install"
    _run(py, "-c", "import onnxruntime, numpy, click, paho.mqtt.client")
    # 181 MB measured (onnxruntime 78, numpy 73, pip and setuptools 25); torch alone is 750 MB.
    assert _site_packages_mb(serve_venv) < 300


def test_hmf_device_profile_and_predict_in_the_serve_only_environment(serve_venv, exported,
                                                                      tmp_path):
    model_dir, state = exported
    cli = serve_venv / "bin" / "hmf-device"
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


def test_join_without_torch_says_how_to_install_it(serve_venv, tmp_path):
    data = tmp_path / "d1.npz"
    np.savez(data, x=np.zeros((4, 3, 151), np.float32), y=np.zeros(4, np.int64))
    work = tmp_path / "work"
    res = subprocess.run([str(serve_venv / "bin" / "hmf-device"), "join", "--broker",
                          "mqtt://127.0.0.1:1", "--device-id", "d1", "--data", str(data),
                          "--work-dir", str(work)], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stderr.startswith("Error: ")
    for words in ("needs torch", "scripts/install-device.sh", "without --serve-only",
                  "https://download.pytorch.org/whl/cpu"):
        assert words in res.stderr
    assert not work.exists()  # refused before it touched anything


TRAIN_ONE_STEP = """
import math, sys
import torch
import device.agent, device.join  # everything join imports to train
from common.models import build_model
from common.training import TrainConfig, train_task
model = build_model("hapt", depth=2)
x, y = torch.randn(16, 3, 151), torch.randint(0, 6, (16,))
_, loss = train_task(model, model.state_dict(), x, y, TrainConfig(epochs=1, batch_size=8), 0)
assert math.isfinite(loss), loss
print(sorted(m for m in {mods} if m in sys.modules))
"""


def test_full_device_environment_trains_with_the_device_requirements_alone(full_venv):
    py = full_venv / "bin" / "python"
    for module in NOT_ON_A_BOARD:
        assert not _importable(py, module), f"{module} is installed in the device install"
    out = _run(py, "-c", TRAIN_ONE_STEP.format(mods=repr(set(NOT_ON_A_BOARD)))).stdout
    assert out.strip() == "[]"
    _run(full_venv / "bin" / "hmf-device", "join", "--help")
