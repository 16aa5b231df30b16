#!/usr/bin/env bash
# The GPU check (`make gpu-check`): the op's tests with real Triton, the op and engine
# benchmarks and a DeepSpeed ZeRO-2 step on one CUDA GPU, in one results file, in under
# 8 minutes with its installs. Details: scripts/gpu_check.py.
#
#   scripts/gpu_check.sh [--out gpu_check.md] [--steps op_tests,ops_bench,...]
#
# PYTHON picks the interpreter (default: .venv/bin/python when it exists, else python3);
# GPU_CHECK_BUDGET the seconds for everything (default 470). Exit status: 0 passed,
# 1 a step failed (or an install did), 2 no CUDA device (checked before anything else).
#
# On a machine without a package registry (the lent H100/H200 machines), carry the wheels
# that scripts/gpu_wheels.sh fetched into .whl/ with the repository.
set -uo pipefail

START=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
BUDGET="${GPU_CHECK_BUDGET:-470}"
say() { echo "[gpu_check] $*"; }

# 1. No CUDA, nothing to do: say so before installing anything.
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here ($PY: torch.cuda.is_available() is False or torch" \
       "does not import); this check needs an NVIDIA GPU. Nothing was run." >&2
  exit 2
fi

# 2. Python packages the machine lacks, into a folder of their own on PYTHONPATH: from
#    .whl/ when it is there, else fetched from the registry the same way.
SITE="${TMPDIR:-/tmp}/noencore_gpu_check_site"
missing=()
for mod in liger_kernel deepspeed audiocraft omegaconf julius flashy dora treetable num2words \
           soundfile hjson pydantic hypothesis; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if ((${#missing[@]})); then
  WHEELS=.whl
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    WHEELS="${TMPDIR:-/tmp}/noencore_gpu_check_wheels"
    say "missing ${missing[*]}: fetching wheels from the registry into $WHEELS"
    PYV="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    PYTHON="$PY" bash scripts/gpu_wheels.sh "$WHEELS" "$PYV" || { say "fetching failed"; exit 1; }
  fi
  say "missing ${missing[*]}: installing $WHEELS/*.whl into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { say "installing the wheels failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 3. Stand-ins for audiocraft's import-only dependencies the machine lacks
#    (scripts/gpu_stubs/README.md).
STUBS="${TMPDIR:-/tmp}/noencore_gpu_check_stubs"
rm -rf "$STUBS" && mkdir -p "$STUBS"
cp scripts/gpu_stubs/_noencore_missing.py "$STUBS/"  # the stand-ins' shared body
for mod in av spacy librosa xformers; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    say "$mod is not installed: using the stand-in from scripts/gpu_stubs"
    cp -r "scripts/gpu_stubs/$mod" "$STUBS/"
  fi
done
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$STUBS"

# 4. noencore itself, with its Triton kernels (noencore.kernels): an editable install
#    when this Python does not have it yet (without the C++ extension: the check runs no
#    CPU kernels).
if ! "$PY" -c 'import noencore.kernels' 2>/dev/null; then
  say "installing noencore (editable, no C++ extension)"
  NOENCORE_NO_CPP=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { say "installing noencore failed"; exit 1; }
fi

# 5. The steps, in what is left of the budget.
LEFT=$((BUDGET - (SECONDS - START)))
say "set-up took $((SECONDS - START)) s; $LEFT s left for the steps"
exec "$PY" scripts/gpu_check.py --budget "$LEFT" "$@"
