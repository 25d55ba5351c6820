#!/usr/bin/env bash
# The install a board gets: a virtual environment with hmf-device in it, torch included only
# where it is wanted and never PyPI's multi-GB CUDA build (docs/DEVICE.md, "Device install").
#
#   scripts/install-device.sh                  # Raspberry Pi OS 64-bit, or any x86-64/aarch64 Linux
#   scripts/install-device.sh --serve-only     # profile/predict/serving only: no torch (~180 MB)
#   scripts/install-device.sh --jetson [--wheel NVIDIA_WHEEL]...   # JetPack 6, NVIDIA's wheels
#   scripts/install-device.sh --dry-run ...    # print the commands, change nothing
#
# Options:
#   --venv DIR       the virtual environment (default: .venv in the checkout); an existing one is
#                    upgraded in place
#   --python PY      the interpreter to build it from (default: python3); must be 64-bit, 3.10+
#   --serve-only     no torch: hmf-device profile and predict, and a device that only fetches the
#                    cloud's graphs; hmf-device join (local training) then refuses to start
#   --jetson         NVIDIA Jetson: torch and onnxruntime are NVIDIA's builds for the JetPack
#                    (installed before, system-wide or with --wheel), never replaced from PyPI
#   --wheel FILE     (with --jetson, repeatable) a wheel of NVIDIA's to install first
#   --torch-index U  where torch's CPU build comes from (default: the torch project's CPU index;
#                    give a mirror of it if the board cannot reach download.pytorch.org)
#   --machine ARCH   x86_64 or aarch64 (default: uname -m); for --dry-run on another machine
#   --dry-run        print every command instead of running it (the checks still run)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The torch project's index of CPU-only wheels (x86-64 and aarch64). PyPI's torch is the CUDA
# build on both and pulls CUDA, cuDNN, NCCL and triton: gigabytes a board cannot use.
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

VENV=$ROOT/.venv
PYTHON=python3
SERVE_ONLY=0
JETSON=0
DRY_RUN=0
MACHINE=$(uname -m)
TORCH_INDEX=$TORCH_CPU_INDEX
WHEELS=()
JETSON_REQS=""  # a temporary file, removed on exit

die() { echo "install-device: $*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --serve-only) SERVE_ONLY=1 ;;
      --jetson) JETSON=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --venv) VENV=${2:?--venv needs a directory}; shift ;;
      --python) PYTHON=${2:?--python needs an interpreter}; shift ;;
      --machine) MACHINE=${2:?--machine needs x86_64 or aarch64}; shift ;;
      --torch-index) TORCH_INDEX=${2:?--torch-index needs a URL}; shift ;;
      --wheel) WHEELS+=("${2:?--wheel needs a file}"); shift ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown option $1 (--help lists them)" ;;
    esac
    shift
  done
  VENV=$(realpath -m "$VENV")
  [ "$MACHINE" = arm64 ] && MACHINE=aarch64  # what macOS-style tools call it
  if [ ${#WHEELS[@]} -gt 0 ] && [ "$JETSON" = 0 ]; then die "--wheel is for --jetson"; fi
  return 0
}

# Only 64-bit x86 and ARM: ONNX Runtime and torch publish no wheels for 32-bit ARM.
check_machine() {
  case $MACHINE in
    x86_64|aarch64) ;;
    armv7l|armv6l|armhf|arm)
      die "this is a 32-bit ARM system ($MACHINE): ONNX Runtime and torch publish no wheels for" \
          "it. Install the 64-bit OS (Raspberry Pi OS 64-bit: uname -m prints aarch64)." ;;
    *) die "unsupported machine $MACHINE: x86_64 or aarch64 only" ;;
  esac
  if [ "$JETSON" = 1 ] && [ "$MACHINE" != aarch64 ]; then
    die "--jetson is for NVIDIA Jetson boards (aarch64), not $MACHINE"
  fi
}

# The interpreter itself must be 3.10+ (pyproject's requires-python) and 64-bit: a 64-bit kernel
# with a 32-bit userland (Raspberry Pi OS 32-bit on a Pi 4/5) reports aarch64 in uname.
check_python() {
  command -v "$PYTHON" >/dev/null 2>&1 || die "no interpreter $PYTHON (give one with --python)"
  local facts
  facts=$("$PYTHON" -c 'import struct, sys; print(*sys.version_info[:2], struct.calcsize("P") * 8)') \
    || die "$PYTHON does not run"
  read -r major minor bits <<<"$facts"
  if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 10 ]; }; then
    die "$PYTHON is Python $major.$minor; hmf needs 3.10 or later (JetPack 5's Python is 3.8:" \
        "see docs/DEVICE.md, NVIDIA Jetson)"
  fi
  [ "$bits" = 64 ] || die "$PYTHON is a ${bits}-bit Python: a 64-bit OS and Python are needed"
}

# Prints a command (shell-quoted, one line) and runs it unless --dry-run.
run() {
  show "$@"
  [ "$DRY_RUN" = 1 ] || "$@"
}

# Same, with the command's own output dropped.
run_quiet() {
  show "$@"
  [ "$DRY_RUN" = 1 ] || "$@" >/dev/null
}

show() {
  local quoted
  quoted=$(printf '%q ' "$@")
  echo "${quoted% }"
}

# torch's pin, read from requirements-device.txt so the script and CI install the same release.
torch_requirement() {
  local line
  line=$(grep -E '^torch[=<>~!]' "$ROOT/requirements-device.txt" | head -n 1)
  [ -n "$line" ] || die "no torch line in requirements-device.txt"
  echo "$line"
}

# The device requirements without torch and onnxruntime, flattened (pip must not replace
# NVIDIA's builds with PyPI's, which are CPU-only on aarch64).
jetson_requirements() {
  local out=$1 files=("$ROOT/requirements-device-serve.txt")
  [ "$SERVE_ONLY" = 1 ] || files+=("$ROOT/requirements-device.txt")
  grep -hvE '^[[:space:]]*(#|-r|$)|^(torch|onnxruntime)([^a-z_-]|$)' "${files[@]}" >"$out"
}

# With --jetson, NVIDIA's torch and onnxruntime must be importable before the rest goes in.
check_jetson_wheels() {
  local py=$VENV/bin/python modules=onnxruntime
  [ "$SERVE_ONLY" = 1 ] || modules="torch, onnxruntime"
  show "$py" -c "import $modules"
  [ "$DRY_RUN" = 1 ] && return 0
  "$py" -c "import $modules" 2>/dev/null && return 0
  die "$modules not importable in $VENV. On a Jetson these are NVIDIA's builds for your" \
      "JetPack (PyPI's are CPU-only there): get the wheels from NVIDIA's Jetson AI Lab index" \
      "(https://pypi.jetson-ai-lab.io, e.g. jp6/cu126) or NVIDIA's 'PyTorch for Jetson' page and" \
      "pass them with --wheel FILE, or install them system-wide first (docs/DEVICE.md)."
}

smoke_test() {
  local code="import numpy, onnxruntime, click, paho.mqtt.client; import device.cli"
  if [ "$SERVE_ONLY" = 0 ]; then
    # A product on the CPU: several torch releases have died of an illegal instruction on a Pi 4.
    code="$code; import torch; assert float(torch.ones(2) @ torch.ones(2)) == 2.0"
  fi
  code="$code; print('hmf-device ready: onnxruntime', onnxruntime.__version__)"
  run "$VENV/bin/python" -c "$code"
  run_quiet "$VENV/bin/hmf-device" --help
}

main() {
  parse_args "$@"
  check_machine
  check_python
  local pip=$VENV/bin/pip venv_flags=() reqs
  # Jetson: keep the system's site-packages visible (TensorRT's bindings, NVIDIA's wheels).
  [ "$JETSON" = 1 ] && venv_flags=(--system-site-packages)
  run "$PYTHON" -m venv "${venv_flags[@]}" "$VENV"
  # manylinux_2_28 wheels (onnxruntime, torch) need pip 20.3+; old venvs bring older pips.
  run "$VENV/bin/python" -m pip install -q "pip>=23"
  if [ "$JETSON" = 1 ]; then
    [ ${#WHEELS[@]} -eq 0 ] || run "$pip" install -q "${WHEELS[@]}"
    check_jetson_wheels
    JETSON_REQS=$(mktemp "${TMPDIR:-/tmp}/hmf-req-jetson.XXXXXX")
    trap 'rm -f "$JETSON_REQS"' EXIT
    jetson_requirements "$JETSON_REQS"
    reqs=$JETSON_REQS
    echo "# $reqs holds: $(tr '\n' ' ' <"$reqs")"
  elif [ "$SERVE_ONLY" = 1 ]; then
    reqs=$ROOT/requirements-device-serve.txt
  else
    run "$pip" install -q --index-url "$TORCH_INDEX" "$(torch_requirement)"
    reqs=$ROOT/requirements-device.txt  # its torch pin is now met by the CPU build
  fi
  run "$pip" install -q -r "$reqs"
  run "$pip" install -q --no-deps -e "$ROOT"  # the hmf-device command
  smoke_test
}

main "$@"
