"""GPU check: what only a GPU can tell about the op and the engine, on one CUDA GPU, in one
results file.

Run it through ``scripts/gpu_check.sh`` (``make gpu-check``), which first installs what
the machine lacks (wheels carried in ``.whl/``, see ``scripts/gpu_wheels.sh``). Steps, in
order, each a subprocess with its own time limit inside one overall budget (default
450 s, so that the whole check with its installs stays under 8 minutes):

=============  ==============================================================================
op_tests       pytest of tests/test_ops*.py with real Triton (TRITON_INTERPRET unset): every
               backend against float64, autotuned kernels, no stream sync in the step's calls,
               the vocabulary-edge cases and the hypothesis property tests (profile "ci")
ops_bench      benchmarks/ops_ratios.py --device cuda --only linear: MusicGen small/medium/large
               heads, eager PyTorch / Liger-Kernel's fused linear CE / ours, bf16 and fp32
ce_bandwidth   benchmarks/ops_ratios.py --device cuda --only ce: CE on logits against a
               device copy (fraction of the copy's bandwidth)
engine_step    benchmarks/engine_ratios.py --device cuda: the engine's step (eager, and bf16
               with --compile's block, its compile seconds apart) and audiocraft's
               cached-token solver step (MusicGen-small: 24 layers), bf16 and fp32
engine_mfu     benchmarks/engine_ratios.py --device cuda --width medium: the engine's bf16
               step at MusicGen-medium's shapes (48 layers of width 1536, B=2 x 30 s), its
               model-FLOPs utilisation against the GPU's datasheet peak
zero2_step     noencore.unlearn(..., zero_stage=2, steps=2) in bf16 on a tiny corpus it writes
=============  ==============================================================================

Output (``--out``, default gpu_check.md): a Markdown table of the steps (status, seconds,
headline numbers against the goals), each benchmark's own tables, the end of the output
of any step that did not pass, and every number as one JSON block at the end.
Exit status: 0 when every step passed; 1 when one failed, timed out or found no time
left; 2 without a CUDA device (nothing is run).

    python scripts/gpu_check.py [--out FILE] [--steps op_tests,ops_bench,...] [--budget S]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUDGET_S = 450
RESERVE_S = 10  # kept back from the budget for writing the results
TAIL = 4000     # characters of a step's output kept in the results


@dataclass(frozen=True)
class Step:
    """One check: ``argv`` runs in the repository root; ``json`` steps get ``--json PATH``
    appended and their numbers read back from it."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    json: bool = False


# Triton compiles each kernel variant and autotuning candidate on first use: spread the
# op tests over processes (pytest-xdist) where it is installed.
_PARALLEL = ("-n", "8") if importlib.util.find_spec("xdist") else ()
STEPS = (
    Step("op_tests", (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short",
                      *_PARALLEL, "tests/test_ops.py", "tests/test_ops_one_pass.py",
                      "tests/test_ops_triton.py", "tests/test_ops_edges.py",
                      "tests/test_ops_properties.py"), 210),
    Step("ops_bench", (PY, "benchmarks/ops_ratios.py", "--device", "cuda", "--only", "linear",
                       "--sizes", "small,medium,large", "--B", "8", "--reps", "10",
                       "--memory-sizes", "small,medium,large", "--require-liger"), 120,
         json=True),
    Step("ce_bandwidth", (PY, "benchmarks/ops_ratios.py", "--device", "cuda", "--only", "ce",
                          "--B", "8", "--reps", "20"), 60, json=True),
    Step("engine_step", (PY, "benchmarks/engine_ratios.py", "--device", "cuda", "--layers", "24",
                         "--batch", "4", "--seconds", "30", "--reps", "5", "--variants",
                         "cached-bf16,engine-bf16,compiled-bf16,cached-fp32,engine-fp32"), 210,
         json=True),
    Step("engine_mfu", (PY, "benchmarks/engine_ratios.py", "--device", "cuda", "--width",
                        "medium", "--layers", "48", "--batch", "2", "--seconds", "30", "--reps",
                        "3", "--variants", "engine-bf16", "--skip-memory"), 120, json=True),
    Step("zero2_step", (PY, "scripts/gpu_check.py", "--zero2-worker"), 150, json=True),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.md", help="the results file (Markdown + JSON)")
    names = [s.name for s in STEPS]
    ap.add_argument("--steps", default=",".join(names),
                    help="comma-separated subset of: " + ", ".join(names))
    ap.add_argument("--budget", type=float, default=BUDGET_S,
                    help="seconds for all steps together (each also has its own limit)")
    # The zero2_step's own process: writes its numbers to --json.
    ap.add_argument("--zero2-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(names))
    if unknown or not steps:
        ap.error(f"--steps: unknown {unknown}; choose from {', '.join(names)}")
    args.steps = steps
    if args.budget <= RESERVE_S:
        ap.error(f"--budget must exceed {RESERVE_S} s")
    return args


def run_step(step: Step, seconds_left: float, env: dict[str, str]) -> dict:
    """Run one step with limit min(its own, ``seconds_left``); its record: status
    ("passed", "failed", "timeout" or "skipped"), seconds, return code, stdout (the
    benchmark tables), the end of its output, and its JSON numbers."""
    rec: dict = {"name": step.name, "status": "skipped", "seconds": 0.0, "returncode": None,
                 "stdout": "", "tail": "", "data": None}
    limit = min(step.timeout_s, seconds_left)
    if limit < 1:
        rec["tail"] = "no time left in the budget"
        return rec
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{step.name}_") as tmp:
        out_json = Path(tmp) / "numbers.json"
        argv = list(step.argv) + (["--json", str(out_json)] if step.json else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=limit)
            rec["returncode"] = proc.returncode
            rec["status"] = "passed" if proc.returncode == 0 else "failed"
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rec["status"] = "timeout"
            stdout = _text(exc.stdout)
            stderr = _text(exc.stderr) + f"\n[gpu_check] stopped after {limit:.0f} s"
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if out_json.exists():
            rec["data"] = json.loads(out_json.read_text())
        elif step.json and rec["status"] == "passed":
            rec["status"] = "failed"
            stderr += "\n[gpu_check] the step wrote no numbers"
    rec["stdout"] = stdout
    rec["tail"] = (stdout + "\n" + stderr)[-TAIL:]
    return rec


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def headline(rec: dict) -> str:
    """The step's numbers that the goals speak of, in one line."""
    data, name = rec.get("data") or {}, rec["name"]
    if name == "op_tests":
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", rec.get("tail", ""))
        return ", ".join(f"{n} {what}" for n, what in counts)
    if name == "ops_bench":
        parts = []
        for r in data.get("linear", []):
            t = r["seconds"]
            s = f"{r['size']} {r['mode']}: ours/eager {t['noencore'] / t['eager']:.2f}"
            if "liger" in t:
                s += f", ours/Liger {t['noencore'] / t['liger']:.2f}"
            parts.append(s)
        return "; ".join(parts)
    if name == "ce_bandwidth":
        return "; ".join(f"{r['dtype']}: {r['seconds']['copy'] / r['seconds']['noencore']:.0%} "
                         f"(in place {r['seconds']['copy'] / r['seconds']['inplace']:.0%}) of "
                         f"copy bandwidth ({r['copy_gbps']:.0f} GB/s)"
                         for r in data.get("ce", []))
    if name == "engine_step":
        t = data.get("step_s", {})
        parts = [f"{p}: {k} {t[f'cached-{p}'] / t[f'{k}-{p}']:.2f}x the cached solver's "
                 "tokens/s" for p in ("bf16", "fp32") for k in ("engine", "compiled")
                 if f"{k}-{p}" in t and f"cached-{p}" in t]
        if data.get("compile_s") is not None:
            parts.append(f"block compiled in {data['compile_s']:.0f} s")
        if data.get("mfu"):
            parts.append("MFU " + ", ".join(f"{v} {u:.0%}" for v, u in data["mfu"].items()))
        return "; ".join(parts)
    if name == "engine_mfu" and data.get("mfu"):
        return (f"MusicGen-medium shapes ({data['layers']} layers, B={data['batch']} x "
                f"{data['seconds']:g} s): " + ", ".join(
                    f"{v} {data['step_s'][v]:.3f} s/step, MFU {u:.1%}"
                    for v, u in data["mfu"].items())
                + f" of {data['peak_flops_per_s']['bf16'] / 1e12:.0f} TFLOP/s bf16 "
                f"({data['peak_source']})")
    if name == "zero2_step" and data:
        return f"{data['steps']} steps, objective {data['objectives']}, {data['seconds']:.1f} s"
    return ""


def machine() -> dict:
    """What ran the check: GPU, driver, library versions."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
    for mod in ("triton", "deepspeed", "liger_kernel", "audiocraft"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:
            info[mod] = None
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def render(results: dict) -> str:
    """The results file: Markdown tables, failure tails, then all numbers as JSON."""
    m = results["machine"]
    lines = ["# GPU check", "",
             f"{m.get('gpu')} (driver {m.get('driver')}, CUDA {m.get('cuda')}); torch "
             f"{m.get('torch')}, triton {m.get('triton')}, Liger-Kernel {m.get('liger_kernel')}, "
             f"DeepSpeed {m.get('deepspeed')}; Python {m.get('python')}; {results['started']}; "
             f"{results['seconds']:.0f} s in all.", "",
             f"**{'PASSED' if results['passed'] else 'FAILED'}**", "",
             "| step | status | seconds | numbers |", "|---|---|---|---|"]
    for rec in results["steps"]:
        lines.append(f"| {rec['name']} | {rec['status']} | {rec['seconds']} | "
                     f"{headline(rec) or '-'} |")
    for rec in results["steps"]:
        tables = [ln for ln in rec.get("stdout", "").splitlines()
                  if ln.startswith(("|", "#", "- ", "FLOP", "Agreement", "torch "))]
        if tables and rec["name"] != "op_tests":
            lines += ["", f"## {rec['name']}", ""] + tables
        if rec["status"] != "passed":
            lines += ["", f"## {rec['name']}: {rec['status']}", "", "```",
                      rec.get("tail", "").strip(), "```"]
    numbers = {k: v for k, v in results.items() if k != "steps"}
    numbers["steps"] = [{k: v for k, v in rec.items() if k != "stdout"}
                        for rec in results["steps"]]
    lines += ["", "## All numbers", "", "```json", json.dumps(numbers, indent=1), "```", ""]
    return "\n".join(lines)


def write_results(path: str | os.PathLike, results: dict) -> Path:
    """Write ``render(results)`` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(results))
    os.replace(tmp, path)
    return path


def read_numbers(path: str | os.PathLike) -> dict:
    """The JSON block of a results file."""
    text = Path(path).read_text()
    return json.loads(text.rsplit("```json\n", 1)[1].split("\n```", 1)[0])


def step_env() -> dict[str, str]:
    """The steps' environment: offline, real Triton, one process group of one rank."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cuda", MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("NOENCORE_CACHE", str(Path(tempfile.gettempdir()) / "noencore_gpu_check"))
    return env


def zero2_worker(out_json: str, device: str) -> int:
    """One ZeRO-2 run of two bf16 steps on a tiny corpus written here: token shards of
    random codes (4 forget, 8 remain items), the tiny MusicGen LM and its condition cache."""
    import math

    sys.path.insert(0, str(ROOT / "tests"))
    from test_engine_shards import random_items, write_shards

    from noencore import unlearn
    from noencore.data.shards import TokenShards
    from noencore.models import build_condition_cache, load_musicgen

    with tempfile.TemporaryDirectory(prefix="gpu_check_zero2_") as tmp:
        shards = TokenShards(write_shards(Path(tmp) / "shards", random_items(4, 8, 80)))
        model = load_musicgen("tiny", with_codec=False)
        build_condition_cache(Path(tmp) / "shards" / "conditions", shards.captions,
                              model.text_encoder, progress=False)
        t0 = time.perf_counter()
        res = unlearn(model, shards, forget="forget", method="graddiff", steps=2,
                      zero_stage=2, device=device, batch_size=4, frames=50, seed=0,
                      lr=1e-4, progress=False, save=False)
        seconds = time.perf_counter() - t0
    objectives = [m["objective"] for m in res.metrics]
    numbers = {"steps": res.steps, "objectives": objectives, "seconds": seconds,
               "grad_norms": [m["grad_norm"] for m in res.metrics],
               "backend": res.metrics[-1].get("backend") if res.metrics else None}
    Path(out_json).write_text(json.dumps(numbers))
    print(json.dumps(numbers))
    ok = res.steps == 2 and all(math.isfinite(x) for x in objectives + numbers["grad_norms"])
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.zero2_worker:
        return zero2_worker(args.json, args.device)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); this "
              "check needs an NVIDIA GPU. Nothing was run.", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    env = step_env()
    records = []
    for step in STEPS:
        if step.name not in args.steps:
            continue
        left = args.budget - RESERVE_S - (time.perf_counter() - t0)
        print(f"[gpu_check] {step.name} (limit {min(step.timeout_s, left):.0f} s)", flush=True)
        rec = run_step(step, left, env)
        print(f"[gpu_check] {step.name}: {rec['status']} in {rec['seconds']} s. "
              f"{headline(rec)}", flush=True)
        records.append(rec)
    results = {"machine": machine(), "started": started, "budget_s": args.budget,
               "seconds": round(time.perf_counter() - t0, 1), "steps": records,
               "passed": all(r["status"] == "passed" for r in records)}
    path = write_results(args.out, results)
    print(f"[gpu_check] {'passed' if results['passed'] else 'FAILED'}; results in {path}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
