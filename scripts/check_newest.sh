#!/usr/bin/env bash
# What would break if the lock moved today (`make newest`; not part of CI).
#
#   scripts/check_newest.sh                 # the whole suite
#   scripts/check_newest.sh -k ops -x       # extra arguments go to pytest
#
# Builds a second environment (.cache/newest/venv) from the newest releases that
# requirements.in and requirements-nodeps.in admit (torch stays the machine's, as in the
# set-up), runs the test suite there from a copy of the working tree, and writes
# .cache/newest/report.md: every package whose newest release differs from
# requirements.lock, and every test that failed. Exit status: pytest's. The project's own
# environment (.venv) and the lock are not touched; `make lock LOCK_ARGS=--upgrade` moves
# the lock once what broke is fixed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$ROOT/.cache/newest"
VENV="$WORK/venv"
SRC="$WORK/src"
PY_SYS="${PYTHON:-python3}"
say() { echo "[newest] $*"; }

rm -rf "$VENV" "$SRC"
mkdir -p "$WORK"
"$PY_SYS" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
TORCH_VER="$("$PY_SYS" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 2.13.0)"
say "torch ${TORCH_VER%%+*} (kept as the set-up keeps it)"
"${PIP[@]}" "torch==${TORCH_VER%%+*}"
echo "torch==${TORCH_VER%%+*}" > "$WORK/constraints.txt"
"${PIP[@]}" -c "$WORK/constraints.txt" --upgrade -r "$ROOT/requirements.in"
"${PIP[@]}" -c "$WORK/constraints.txt" --upgrade --no-deps -r "$ROOT/requirements-nodeps.in"
if [[ -z "$("$PY" -c 'import torch; print(torch.version.cuda or "")')" ]]; then
  TA_DIR="$("$PY" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')"
  "$PY" -c 'import torchaudio' 2>/dev/null || rm -f "$TA_DIR"/lib/*.so "$TA_DIR"/*.so
fi

# The suite runs from a copy of the tracked tree, installed editable into this
# environment, so that its subprocesses (2-rank launches) import this copy too.
mkdir -p "$SRC"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
  | (cd "$ROOT" && xargs -0 cp --parents -P -t "$SRC" 2>/dev/null || true)
"${PIP[@]}" -c "$WORK/constraints.txt" --no-build-isolation --no-deps -e "$SRC"

# Versions that differ from the lock.
"$PY" -m pip list --format=freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
  | grep -E '^[A-Za-z0-9][^ ]*==' | grep -v '^pip==' | sort > "$WORK/freeze.txt"
grep -E '^[A-Za-z0-9][^ ]*==' "$ROOT/requirements.lock" | sed 's/ .*//' | sort > "$WORK/locked.txt"
"$PY" - "$WORK" <<'PYDIFF'
import re, sys
from pathlib import Path
work = Path(sys.argv[1])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
def read(p):
    return {norm(a): b for a, _, b in (l.strip().partition("==") for l in p.read_text().splitlines()) if b}
new, old = read(work / "freeze.txt"), read(work / "locked.txt")
rows = [f"| {n} | {old.get(n, '(not locked)')} | {new.get(n, '(absent)')} |"
        for n in sorted(set(new) | set(old)) if n != "noencore" and n != "torch"
        and old.get(n) != new.get(n)]
(work / "moved.md").write_text("| package | locked | newest |\n|---|---|---|\n"
                               + "\n".join(rows) + "\n")
print(f"[newest] {len(rows)} package(s) differ from the lock")
PYDIFF

say "running the suite from $SRC"
set +e
(cd "$SRC" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu MPLBACKEND=Agg \
  TORCHINDUCTOR_CACHE_DIR="$WORK/cache/inductor" TORCH_EXTENSIONS_DIR="$WORK/cache/torch_extensions" \
  TRITON_CACHE_DIR="$WORK/cache/triton" NOENCORE_REQUIRE_CPP=1 \
  "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/junit.xml" tests "$@" \
  > "$WORK/pytest.log" 2>&1)
STATUS=$?
set -e
tail -n 3 "$WORK/pytest.log"
{
  echo "# Newest releases against requirements.lock ($(date -u +%Y-%m-%d))"
  echo
  echo "pytest exit status: $STATUS; log: $WORK/pytest.log"
  echo
  echo "## Failed tests"
  echo
  grep -E '^(FAILED|ERROR) ' "$WORK/pytest.log" | sed 's/^/- /' || echo "none"
  echo
  echo "## Packages that moved"
  echo
  cat "$WORK/moved.md"
} > "$WORK/report.md"
say "report: $WORK/report.md"
exit "$STATUS"
