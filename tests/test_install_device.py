"""scripts/install-device.sh, the install a board gets, as printed by --dry-run for each case.

A real serve-only install by the script is in tests/test_device_slim.py; a real full install
needs download.pytorch.org, which this machine does not reach. The machine is always given
(--machine), so what is printed does not depend on the CPU the tests run on.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-device.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _dry_run(*args: str, venv: Path, python: str = sys.executable
             ) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--venv", str(venv),
                           "--python", python, *args],
                          capture_output=True, text=True, timeout=60)


def _commands(*args: str, venv: Path) -> list[list[str]]:
    """The commands the script would run, as argument lists (comment lines left out)."""
    res = _dry_run(*args, venv=venv)
    assert res.returncode == 0, res.stderr
    assert not venv.exists(), "--dry-run created the environment"
    return [shlex.split(line) for line in res.stdout.splitlines()
            if line and not line.startswith("#")]


def _pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if c[1:3] == ["install", "-q"] and c[0].endswith("/pip")]


def _torch_pin() -> str:
    text = (ROOT / "requirements-device.txt").read_text()
    return re.search(r"^torch==\S+", text, re.M).group(0)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_full_install_takes_torch_from_the_cpu_index_first(machine, tmp_path):
    venv = tmp_path / "venv"
    installs = _pip_installs(_commands("--machine", machine, venv=venv))
    torch_lines = [c for c in installs if any(a.startswith("torch") for a in c)]
    assert torch_lines == [[f"{venv}/bin/pip", "install", "-q", "--index-url", CPU_INDEX,
                            _torch_pin()]]
    # Then the rest, whose torch pin the CPU build already meets, then hmf itself.
    assert installs[1:] == [
        [f"{venv}/bin/pip", "install", "-q", "-r", str(ROOT / "requirements-device.txt")],
        [f"{venv}/bin/pip", "install", "-q", "--no-deps", "-e", str(ROOT)]]
    assert installs[0] == torch_lines[0]


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_serve_only_installs_no_torch(machine, tmp_path):
    venv = tmp_path / "venv"
    commands = _commands("--serve-only", "--machine", machine, venv=venv)
    assert not [c for c in commands if "torch" in " ".join(c)]
    assert [c[3:] for c in _pip_installs(commands)] == [
        ["-r", str(ROOT / "requirements-device-serve.txt")], ["--no-deps", "-e", str(ROOT)]]
    # It ends with the import smoke test and the console script.
    assert commands[-2][:2] == [f"{venv}/bin/python", "-c"]
    assert "import numpy, onnxruntime" in commands[-2][2]
    assert commands[-1] == [f"{venv}/bin/hmf-device", "--help"]


@pytest.mark.parametrize("serve_only", [False, True])
def test_jetson_keeps_nvidias_torch_and_onnxruntime(serve_only, tmp_path):
    venv = tmp_path / "venv"
    flags = ["--jetson", "--machine", "aarch64", "--wheel", "/wheels/onnxruntime_gpu.whl"]
    res = _dry_run(*flags, *(["--serve-only"] if serve_only else []), venv=venv)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert commands[0][-3:] == ["venv", "--system-site-packages", str(venv)]
    assert not [c for c in commands if "--index-url" in c]  # nothing from torch's or PyPI's
    installs = _pip_installs(commands)
    assert installs[0][3:] == ["/wheels/onnxruntime_gpu.whl"]
    # NVIDIA's builds must import before the rest goes in; the rest leaves them out.
    check = commands[commands.index(installs[0]) + 1]
    assert check[2] == ("import onnxruntime" if serve_only else "import torch, onnxruntime")
    filtered = [line for line in lines if line.startswith("# ") and "holds:" in line]
    assert len(filtered) == 1
    held = filtered[0].split("holds:")[1].split()
    assert sorted(held) == ["click>=8.1", "numpy>=1.26", "paho-mqtt>=2.0,<3"]
    assert installs[1][3] == "-r" and installs[1][4] == filtered[0].split()[1]


@pytest.mark.parametrize("args, message", [
    (["--machine", "armv7l"], "32-bit ARM"),
    (["--machine", "x86_64", "--jetson"], "--jetson is for NVIDIA Jetson"),
    (["--machine", "riscv64"], "unsupported machine riscv64"),
    (["--wheel", "x.whl"], "--wheel is for --jetson"),
    (["--python", "no-such-python3"], "no interpreter no-such-python3"),
])
def test_refuses_what_cannot_work(args, message, tmp_path):
    res = _dry_run(*args, venv=tmp_path / "venv")
    assert res.returncode != 0 and message in res.stderr and not res.stdout


def _interpreter(path: Path, major: int, minor: int, bits: int) -> str:
    """An executable that answers the script's one question of an interpreter (version and
    pointer size) as JetPack 5's Python 3.8 or a 32-bit build would. No such Python is on CI's
    machine; the script's refusal is what is under test, and it reads only this answer."""
    path.write_text(f"#!/bin/sh\necho {major} {minor} {bits}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("version, message", [
    ((3, 8, 64), "is Python 3.8; hmf needs 3.10 or later"),
    ((3, 11, 32), "32-bit"),
])
def test_refuses_an_interpreter_that_cannot_work(version, message, tmp_path):
    python = _interpreter(tmp_path / "python", *version)
    res = _dry_run("--jetson", "--machine", "aarch64", venv=tmp_path / "venv", python=python)
    assert res.returncode != 0 and message in res.stderr and not (tmp_path / "venv").exists()
