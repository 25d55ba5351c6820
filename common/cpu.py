"""What CPU this is, as far as int8 speed and accuracy depend on it.

ONNX Runtime picks its int8 kernels by instruction set: on x86, VNNI (AVX512-VNNI or AVX-VNNI)
or, without it, AVX2's ``vpmaddubsw`` whose 16-bit sums saturate; on ARM, the dot-product
instructions (``asimddp``) or plain NEON. A number measured on one CPU names it with these.
Standard library only: the export, the cloud and a board all call it.
"""

from __future__ import annotations

import platform
from pathlib import Path

# The /proc/cpuinfo flags that change which int8 kernels ONNX Runtime runs.
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "avx512bw", "amx_int8", "asimddp", "i8mm")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU (x86: its model name; Raspberry Pi / Jetson: the board's model)."""
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    try:
        model = Path("/proc/device-tree/model").read_text().strip().rstrip("\x00")
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine()


def int8_flags() -> list[str]:
    """The flags of ``INT8_FLAGS`` this CPU has (x86 ``flags``, ARM ``Features``)."""
    have: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            have.update(line.split(":", 1)[1].split())
    return [f for f in INT8_FLAGS if f in have]


def int8_isa() -> str:
    """A short name for the int8 kernels this CPU gets: ``x86-vnni``, ``x86-avx2`` (no VNNI),
    ``arm-dotprod``, ``arm-neon`` or the machine's name where /proc/cpuinfo says nothing."""
    flags, machine = set(int8_flags()), platform.machine()
    if machine in ("x86_64", "AMD64"):
        return "x86-vnni" if flags & {"avx512_vnni", "avx_vnni"} else (
            "x86-avx2" if "avx2" in flags else "x86-sse")
    if machine in ("aarch64", "arm64"):
        return "arm-dotprod" if "asimddp" in flags else "arm-neon"
    return machine


def describe() -> dict[str, object]:
    """CPU name, machine, int8 kernel family and flags: what a measurement names."""
    return {"cpu": cpu_name(), "machine": platform.machine(), "int8_isa": int8_isa(),
            "int8_flags": int8_flags()}
