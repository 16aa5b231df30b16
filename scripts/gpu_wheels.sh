#!/usr/bin/env bash
# Fetch the wheels scripts/gpu_check.sh installs on a GPU machine that cannot reach a
# package registry (the lent H100/H200 machines): run it here, where pip works, then
# carry the folder with the repository (it is ignored by git).
#
#   scripts/gpu_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]
#
# What travels: Liger-Kernel (the ops benchmark's second baseline), hypothesis (the op
# property tests), DeepSpeed and its missing dependencies (the ZeRO-2 step), audiocraft
# and the small packages it imports (MusicGen's LM). torch, triton, transformers, numpy and the rest are the machine's own.
# audiocraft's heavy import-time dependencies that no step calls (av, spacy, librosa,
# xformers: ~200 MB) do not travel; gpu_check.sh puts stand-ins from scripts/gpu_stubs
# in their place when they are missing. Versions are the ones the CPU test suite runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PYV="${2:-3.12}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$DEST"

WHEELS=(liger-kernel==0.8.5 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 julius==0.2.8
        num2words==0.5.14 omegaconf==2.4.0 dora-search==0.1.13 treetable==0.2.6
        submitit==1.5.4 retrying==1.4.2 colorlog==6.12.0 hjson==3.1.0 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        hypothesis==6.170.27 sortedcontainers==2.4.0)
# Published as source only: built here into pure-Python wheels.
SDISTS=(audiocraft==1.3.0 flashy==0.0.2 docopt==0.6.2)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SDISTS[@]}"
# DeepSpeed's setup.py imports torch: build against the torch here, without its C++/CUDA
# ops (they are compiled on first use where they are needed; the check needs none).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
du -sh "$DEST"
ls "$DEST"
