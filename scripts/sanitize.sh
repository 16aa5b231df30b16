#!/usr/bin/env bash
# Memory safety of the C++ kernels: build noencore._C with AddressSanitizer and
# UndefinedBehaviorSanitizer into .cache/sanitize (the installed extension is left as it
# is) and run the op tests on that build, with NOENCORE_CPU_DEBUG=1 (scratch starts as NaN,
# gradient GEMM operands are read up to their row stride). Any finding stops the run with
# a non-zero exit status (halt_on_error, -fno-sanitize-recover), and so fails `make`.
#
#   scripts/sanitize.sh [pytest arguments]     # default: the op tests' C++ cases
#
# Python is not built with ASan: the compiler's runtimes are preloaded into it
# (LD_PRELOAD), and leak checking is off (the interpreter keeps memory until exit by design).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="$ROOT/.cache/sanitize"
mkdir -p "$OUT"
t0=$(date +%s)

# ninja rebuilds only what changed (a fresh clone: the whole extension, ~2 minutes on 2 cores).
rm -f "$OUT"/lib/noencore/_C*.so
NOENCORE_SANITIZE=1 "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/build" \
  > "$OUT.build.log" 2>&1 || { tail -40 "$OUT.build.log"; echo "[sanitize] build failed"; exit 1; }
SO="$(ls "$OUT"/lib/noencore/_C*.so)"
t1=$(date +%s)
echo "[sanitize] built $SO in $((t1 - t0)) s"

CXX="${CXX:-$("$PY" -c 'import sysconfig; print((sysconfig.get_config_var("CXX") or "g++").split()[0])')}"
command -v "$CXX" >/dev/null || CXX=g++
runtime() { readlink -f "$("$CXX" -print-file-name="$1")"; }
ASAN_LIB="$(runtime libasan.so)"
UBSAN_LIB="$(runtime libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [[ -f "$lib" ]] || { echo "[sanitize] $CXX has no sanitizer runtime ($lib)"; exit 1; }
done
if [[ "$(ldd "$SO")" != *libasan.so* ]]; then
  echo "[sanitize] $SO is not linked against AddressSanitizer's runtime"; exit 1
fi

ARGS=("$@")
if [[ ${#ARGS[@]} -eq 0 ]]; then
  # The op tests' C++ cases (the torch and Triton ones run none of the extension's code).
  ARGS=(tests/test_ops.py tests/test_ops_one_pass.py tests/test_ops_edges.py
        tests/test_ops_properties.py -k cpp)
fi
# --capture=sys: a report written by the runtimes (to fd 2) reaches the terminal even
# when the finding aborts the interpreter.
status=0
env LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  NOENCORE_TEST_EXTENSION="$SO" NOENCORE_CPU_DEBUG=1 NOENCORE_REQUIRE_CPP=1 \
  "$PY" -m pytest -q -p no:cacheprovider --capture=sys "${ARGS[@]}" || status=$?
t2=$(date +%s)
echo "[sanitize] tests on the ASan/UBSan build: exit $status in $((t2 - t1)) s (total $((t2 - t0)) s)"
exit "$status"
