"""The GPU check's CPU side (scripts/gpu_check.py, scripts/gpu_check.sh): arguments, the
step runner (pass, fail, time-out, numbers), the results file, and the refusal without
CUDA. The GPU steps themselves run only on a GPU machine (`make gpu-check`)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def _load(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_arguments(gc):
    args = gc.parse_args([])
    assert args.steps == [s.name for s in gc.STEPS] and args.out == "gpu_check.md"
    assert args.budget == gc.BUDGET_S < 480  # the check's own limit: under 8 minutes
    assert gc.parse_args(["--steps", "ops_bench,zero2_step"]).steps == ["ops_bench", "zero2_step"]
    for bad in (["--steps", "op_tests,nope"], ["--steps", ""], ["--budget", "3"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_every_step_has_its_own_limit_inside_the_budget(gc):
    assert len({s.name for s in gc.STEPS}) == len(gc.STEPS)
    assert all(0 < s.timeout_s < gc.BUDGET_S for s in gc.STEPS)
    # The op tests run every op test file with real Triton.
    tests = {a for a in gc.STEPS[0].argv if a.startswith("tests/")}
    assert tests == {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_ops*.py")
                     if p.name != "test_ops_audiocraft.py"}
    assert "TRITON_INTERPRET" not in gc.step_env()


def test_step_runner(gc, tmp_path):
    env = dict(os.environ)
    ok = gc.run_step(gc.Step("ok", _py("print('| a | b |')"), 30), 100, env)
    assert ok["status"] == "passed" and ok["returncode"] == 0 and "| a | b |" in ok["stdout"]
    bad = gc.run_step(gc.Step("bad", _py("import sys; print('boom'); sys.exit(3)"), 30), 100,
                      env)
    assert bad["status"] == "failed" and bad["returncode"] == 3 and "boom" in bad["tail"]
    slow = gc.run_step(gc.Step("slow", _py("import time; print('started', flush=True); "
                                           "time.sleep(60)"), 60), 1.5, env)
    assert slow["status"] == "timeout" and slow["seconds"] < 30
    assert "started" in slow["tail"] and "stopped after" in slow["tail"]
    late = gc.run_step(gc.Step("late", _py("pass"), 30), 0.5, env)
    assert late["status"] == "skipped" and "no time left" in late["tail"]
    numbers = gc.run_step(gc.Step("nums", _py(
        "import json, sys; open(sys.argv[-1], 'w').write(json.dumps({'x': 1}))"), 30,
        json=True), 100, env)
    assert numbers["status"] == "passed" and numbers["data"] == {"x": 1}
    silent = gc.run_step(gc.Step("silent", _py("pass"), 30, json=True), 100, env)
    assert silent["status"] == "failed" and "wrote no numbers" in silent["tail"]


def _records() -> list[dict]:
    def rec(name, status="passed", data=None, stdout="", tail=""):
        return {"name": name, "status": status, "seconds": 1.0, "returncode": 0,
                "stdout": stdout, "tail": tail, "data": data}

    sec = {"eager": 2.0, "noencore": 1.0, "liger": 1.25}
    return [
        rec("op_tests", tail="212 passed, 3 skipped in 80.0s"),
        rec("ops_bench", data={"linear": [{"size": "small", "mode": "bf16", "seconds": sec}]},
            stdout="| head | eager |\n|---|---|\n| small | 2.00 ms |\nprogress line"),
        rec("ce_bandwidth", data={"ce": [{"dtype": "float32", "copy_gbps": 4000.0, "seconds": {
            "copy": 1.0, "noencore": 1.25, "inplace": 1.1, "eager": 5.0}}]}),
        rec("engine_step", data={"step_s": {"cached-bf16": 3.0, "engine-bf16": 1.5}}),
        rec("engine_mfu", data={"layers": 48, "batch": 2, "seconds": 30.0,
                                "step_s": {"engine-bf16": 0.25}, "mfu": {"engine-bf16": 0.4},
                                "peak_flops_per_s": {"bf16": 989e12, "fp32": 67e12},
                                "peak_source": "NVIDIA H200: H200 datasheet, dense"}),
        rec("zero2_step", "timeout", tail="Traceback: something\n[gpu_check] stopped after 150 s"),
    ]


def test_results_file(gc, tmp_path):
    results = {"machine": {"gpu": "NVIDIA H200", "torch": "2.11.0", "liger_kernel": "0.8.5"},
               "started": "2026-12-02 04:00 UTC", "budget_s": 450, "seconds": 301.0,
               "steps": _records(), "passed": False}
    path = gc.write_results(tmp_path / "out" / "gpu_check.md", results)
    text = path.read_text()
    assert not list(path.parent.glob("*.tmp")), "written atomically"
    assert "**FAILED**" in text and "NVIDIA H200" in text
    assert "| op_tests | passed | 1.0 | 212 passed, 3 skipped |" in text
    assert "small bf16: ours/eager 0.50, ours/Liger 0.80" in text
    assert "float32: 80% (in place 91%) of copy bandwidth (4000 GB/s)" in text
    assert "bf16: engine 2.00x the cached solver's tokens/s" in text
    assert ("MusicGen-medium shapes (48 layers, B=2 x 30 s): engine-bf16 0.250 s/step, MFU "
            "40.0% of 989 TFLOP/s bf16 (NVIDIA H200: H200 datasheet, dense)") in text
    assert "## ops_bench" in text and "| small | 2.00 ms |" in text
    assert "progress line" not in text  # only the benchmark's tables are copied
    assert "## zero2_step: timeout" in text and "Traceback: something" in text
    numbers = gc.read_numbers(path)
    assert numbers["passed"] is False and numbers["machine"]["gpu"] == "NVIDIA H200"
    assert [s["name"] for s in numbers["steps"]] == [r["name"] for r in _records()]
    assert numbers["steps"][1]["data"]["linear"][0]["seconds"]["liger"] == 1.25


def test_results_file_is_replaced_whole(gc, tmp_path, monkeypatch):
    """A failure while rendering leaves the previous results file as it was."""
    path = tmp_path / "gpu_check.md"
    path.write_text("previous results")

    def broken(results):
        raise RuntimeError("render failed")

    monkeypatch.setattr(gc, "render", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        gc.write_results(path, {})
    assert path.read_text() == "previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.md"]


def test_main_runs_the_steps_and_reports(gc, tmp_path, monkeypatch):
    """With CUDA faked and steps replaced by quick commands: exit 0 when all pass, 1 when
    one fails, and the results file either way."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "machine", lambda: {"gpu": "fake"})
    monkeypatch.setattr(gc, "STEPS", (gc.Step("first", _py("print('| x |')"), 30),
                                      gc.Step("second", _py("pass"), 30)))
    out = tmp_path / "r.md"
    assert gc.main(["--out", str(out)]) == 0
    assert gc.read_numbers(out)["passed"] is True
    monkeypatch.setattr(gc, "STEPS", (gc.Step("first", _py("import sys; sys.exit(1)"), 30),
                                      gc.Step("second", _py("pass"), 30)))
    assert gc.main(["--out", str(out), "--steps", "first"]) == 1
    numbers = gc.read_numbers(out)
    assert [s["name"] for s in numbers["steps"]] == ["first"] and numbers["passed"] is False


def test_refuses_without_cuda(gc, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "r.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
    # The shell entry point says so too, before installing anything.
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr and "installing" not in proc.stdout


def test_benchmarks_refuse_cuda_without_it(monkeypatch, capsys):
    """The benchmarks the check runs say so and exit 2 when asked for CUDA without it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for rel in ("benchmarks/ops_ratios.py", "benchmarks/engine_ratios.py"):
        bench = _load(Path(rel).stem, rel)
        assert bench.main(["--device", "cuda"]) == 2, rel
        assert "no CUDA device" in capsys.readouterr().err, rel


def test_liger_row_is_required_and_versions_checked(gc, monkeypatch, capsys):
    """The check's ops benchmark fails, rather than leaving Liger-Kernel's row out, when
    Liger is missing; versions before 0.8.2 (wrong per-row gradients) count as missing."""
    import importlib.metadata

    step = next(s for s in gc.STEPS if s.name == "ops_bench")
    assert "--require-liger" in step.argv
    bench = _load("ops_ratios", "benchmarks/ops_ratios.py")
    assert "GPUs only" in bench.liger_missing("cpu")
    monkeypatch.setattr(bench, "_liger_loss", lambda: None)
    for got, missing in (("0.8.1", True), ("0.5.10", True), ("0.8.2", False),
                         ("0.10.0", False)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, got=got: got)
        why = bench.liger_missing("cuda")
        assert (why is not None) == missing, (got, why)
        if missing:
            assert got in why and "0.8.2" in why
    assert bench.main(["--require-liger"]) == 1  # CPU: no Liger row possible
    assert "--require-liger: Liger-Kernel runs on GPUs only" in capsys.readouterr().err


def test_stand_ins_import_and_name_the_package_to_install(tmp_path):
    """The GPU check's stand-ins for audiocraft's import-only dependencies import and
    name attributes, and any use raises ModuleNotFoundError naming the real package;
    copied as gpu_check.sh copies them (each folder plus the shared body)."""
    import shutil

    stubs = ROOT / "scripts" / "gpu_stubs"
    shutil.copy(stubs / "_noencore_missing.py", tmp_path)
    for mod in ("av", "spacy", "librosa"):
        shutil.copytree(stubs / mod, tmp_path / mod)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import av, spacy, librosa\n"
        "for mod, attr in ((av, 'AudioFrame'), (spacy, 'load'), (librosa, 'resample')):\n"
        "    f = getattr(mod, attr)\n"
        "    try:\n"
        "        f(1)\n"
        "    except ModuleNotFoundError as e:\n"
        "        assert e.name == mod.__name__ and f'install {mod.__name__}' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(f'{mod.__name__}.{attr}() did not raise')\n"
        "print('stand-ins ok')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "stand-ins ok" in out.stdout, out.stderr


def test_model_flops_utilisation_divides_by_the_assumed_peak(monkeypatch):
    """engine_ratios' MFU: the LM's FLOPs over step time x the peak of the step's
    precision; the peak is the named GPU's datasheet figure (the most specific name first),
    and the measured matmul rate where the device is not in the table."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    er = _load("engine_ratios_mfu", "benchmarks/engine_ratios.py")
    import torch

    rates = {"fp32": 2e11, "bf16": 5e11}
    assert er.assumed_peak("cpu", rates) == (rates, "the matmul rate measured in this run")
    for name, bf16 in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        peaks, source = er.assumed_peak("cuda", rates)
        assert peaks["bf16"] == bf16 and name in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert er.assumed_peak("cuda", rates)[0] == rates
    got = er.mfu({"engine-bf16": 2.0, "cached-fp32": 4.0}, 1e12, rates)
    assert got == {"engine-bf16": 1e12 / (2.0 * 5e11), "cached-fp32": 1e12 / (4.0 * 2e11)}
