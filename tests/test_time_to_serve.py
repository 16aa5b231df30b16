"""benchmarks/time_to_serve.py on a demo folder the test writes: its sums, ratios, model
FLOPs and extrapolation against values computed here from the same inputs, and its
errors on a missing or malformed metrics.jsonl."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    if "time_to_serve" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "time_to_serve", ROOT / "benchmarks" / "time_to_serve.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while defined
        spec.loader.exec_module(module)
    return sys.modules["time_to_serve"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny model's folder, its LM's parameter count and codebooks, and the LM."""
    from noencore.models import load_musicgen, save_musicgen

    model = load_musicgen("tiny", with_codec=False)
    folder = save_musicgen(model, tmp_path_factory.mktemp("tiny") / "model")
    params = sum(p.numel() for p in model.lm.parameters())
    return folder, params, len(model.lm.linears), model.lm


# each run: (method in config.json, its request's stop reason or None: no request record)
RUNS = {"memorised": ("finetune", None), "retrained": ("finetune", None),
        "retrained_order1": ("finetune", None),  # the demo's retrained twin: no request
        "ga": ("ga", "nonmember_auc"), "match": ("match", "max_steps")}


def _write_run(run_dir: Path, model_src: Path, method: str, stopped: str | None,
               rng: random.Random, t0: float) -> dict:
    """A run folder: config.json, metrics.jsonl with fresh random numbers, the saved
    model (with this run's request when ``stopped``), file times ``t0`` (config.json)
    to ``t0 + wall`` (the model). Returns what was written."""
    from noencore.models.requests import make_request, write_requests

    steps = rng.randint(2, 9)
    planned = steps if stopped in (None, "max_steps") else steps + rng.randint(1, 5)
    records = [{"step": i + 1, "forget_nll": rng.random(), "tokens": float(rng.randint(1, 5000)),
                "tokens_per_s": 1.0, "step_s": rng.uniform(0.01, 3.0)} for i in range(steps)]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"method": method, "steps": planned, "batch_size": rng.randint(1, 32),
              "frames": 250, "resume": False, "lora": None, "stop_every": 1,
              "stop_nonmembers": None if stopped is None else "valid"}
    (run_dir / "config.json").write_text(json.dumps(config))
    shutil.copytree(model_src, run_dir / "model")
    if stopped is not None:
        write_requests(run_dir / "model", [make_request(
            forget="forget", forget_ids=["a"], remain="remain", method={"name": method},
            shards="shards", steps=steps, stopped=stopped)])
    loop = sum(r["step_s"] for r in records)
    wall = loop + rng.uniform(0.5, 100.0)
    os.utime(run_dir / "config.json", (t0, t0))
    for p in (run_dir / "model").rglob("*"):
        os.utime(p, (t0 + wall - 1.0, t0 + wall - 1.0))
    os.utime(run_dir / "model" / "requests.json", (t0 + wall, t0 + wall))
    return {"steps": steps, "tokens": sum(r["tokens"] for r in records), "loop": loop,
            "wall": wall, "batch": config["batch_size"]}


@pytest.fixture
def demo(tmp_path, tiny):
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    written = {name: _write_run(tmp_path / "demo" / "models" / name, tiny[0], method, stopped,
                                rng, 1.7e9 + 1000.0 * i)
               for i, (name, (method, stopped)) in enumerate(RUNS.items())}
    return tmp_path / "demo", written, seed


def test_table_sums_ratios_and_flops(demo, tiny, tmp_path, capsys):
    bench = _bench()
    folder, written, seed = demo
    _, params, n_q, _ = tiny
    result = bench.measure_demo(folder)
    rows = {r["name"]: r for r in result["methods"]}
    # memorised, retrained and the retrained twin are not methods
    assert sorted(rows) == ["ga", "match"], seed
    ret = written["retrained"]
    flops = {name: 6.0 * params * w["tokens"] / n_q for name, w in written.items()}
    for name, row in [*rows.items(), ("retrained", result["retrained"])]:
        w = written[name]
        assert row["steps"] == w["steps"], seed
        assert row["tokens"] == pytest.approx(w["tokens"]), seed
        assert row["loop_s"] == pytest.approx(w["loop"]), seed
        assert row["run_wall_s"] == pytest.approx(w["wall"], abs=1e-3), seed
        assert row["params"] == params and row["n_q"] == n_q
        assert row["flops"] == pytest.approx(flops[name]), seed
        r = row["vs_retrained"]
        assert r["loop_s"] == pytest.approx(w["loop"] / ret["loop"]), seed
        assert r["run_wall_s"] == pytest.approx(w["wall"] / ret["wall"], rel=1e-6), seed
        assert r["flops"] == pytest.approx(flops[name] / flops["retrained"]), seed
    assert rows["ga"]["stopped"] == "nonmember_auc"
    assert rows["ga"]["stop_source"] == "model/requests.json"
    assert rows["match"]["stopped"] == "max_steps"
    assert result["retrained"]["stopped"] == "max_steps"
    assert result["retrained"]["stop_source"] == "config.json steps"

    out = tmp_path / "res" / "serve.md"
    assert bench.main(["--demo", str(folder), "--out", str(out),
                       "--request-method", "ga"]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    assert text.strip() in printed
    assert bench.FORMULA in text and "extrapolated, not measured" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and "FLOPs /" not in ln]
    assert [ln.split(" | ")[0] for ln in table[:3]] == ["| ga", "| match",
                                                        "| retrained (gold standard)"]
    ga_row = table[0].split(" | ")
    assert ga_row[2] == str(written["ga"]["steps"]) and ga_row[6] == f"{flops['ga']:.3g}"
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["retrained"]["flops"] == pytest.approx(flops["retrained"])
    ex = data["extrapolation"]
    assert ex["request_tokens"] == written["ga"]["steps"] * written["ga"]["batch"] * (4 * 1500 - 6)
    assert not list(out.parent.glob(".*")), "no temporary files left"


def test_extrapolation_against_its_formula(tiny):
    """Tokens per window as the engine counts them (token_mask on a full window), and the
    FLOPs and times of the extrapolation from the planner's parameter count."""
    import torch

    from noencore.models.adapter import token_mask
    from noencore.planner import arch_from_checkpoint, get_arch

    bench = _bench()
    folder, _, n_q, lm = tiny
    frames = random.randint(5, 300)
    engine = int(token_mask(lm, torch.ones(1, n_q, frames, dtype=torch.bool)).sum())
    assert bench.window_tokens(arch_from_checkpoint(folder), frames) == engine

    tokens = random.uniform(1e5, 1e8)
    node = bench.Node(gpus=8, peak_tflops=989.0, mfu=random.uniform(0.1, 0.9))
    ex = bench.extrapolate(tokens, corpus_hours=1000.0, epochs=2.0, node=node)
    p = get_arch("facebook/musicgen-large").n_params()
    rate = 8 * 989e12 * node.mfu
    assert ex["params"] == p
    assert ex["request_flops"] == pytest.approx(6 * p * tokens / 4)
    assert ex["request_s"] == pytest.approx(6 * p * tokens / 4 / rate)
    corpus_tokens = 1000 * 3600 / 30 * 2 * (4 * 1500 - 6)
    assert ex["retrain_tokens"] == pytest.approx(corpus_tokens)
    assert ex["retrain_s"] == pytest.approx(6 * p * corpus_tokens / 4 / rate)
    assert ex["ratio"] == pytest.approx(tokens / corpus_tokens)
    text = bench.format_extrapolation(ex)
    assert "extrapolated, not measured" in text and f"MFU {node.mfu:g}" in text


@pytest.mark.parametrize("damage", ["missing", "not_json", "no_tokens", "step_gap", "empty"])
def test_bad_metrics_name_the_file(demo, damage):
    bench = _bench()
    folder, _, _ = demo
    path = folder / "models" / "ga" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    if damage == "missing":
        path.unlink()
    elif damage == "not_json":
        path.write_text("\n".join([lines[0], "{\"step\": 2, \"tok"]) + "\n")
    elif damage == "no_tokens":
        rec = json.loads(lines[1])
        del rec["tokens"]
        path.write_text("\n".join([lines[0], json.dumps(rec)]) + "\n")
    elif damage == "step_gap":
        path.write_text("\n".join([lines[0], json.dumps({**json.loads(lines[1]), "step": 3})])
                        + "\n")
    else:
        path.write_text("")
    with pytest.raises(bench.ServeError, match=re.escape(str(path))) as info:
        bench.measure_demo(folder)
    if damage == "not_json":  # the engine's reader names the line
        assert "line 2 is not JSON" in str(info.value)
    if damage in ("no_tokens", "step_gap"):
        assert "step record 2" in str(info.value)


def test_run_folder_errors_and_file_times(demo):
    """A folder whose request disagrees with its steps, a demo without its retrained
    model, and file times that cannot hold the steps (given as not found, with why)."""
    bench = _bench()
    folder, written, _ = demo
    ga = folder / "models" / "ga"
    os.utime(ga / "config.json", (2e9, 2e9))  # after the model's files: times not kept
    row = bench.measure_demo(folder)["methods"][0]
    assert row["name"] == "ga" and row["run_wall_s"] is None
    assert "times were not kept" in row["run_wall_source"]
    assert row["vs_retrained"]["run_wall_s"] is None
    assert "no run wall time" in bench.format_table(bench.measure_demo(folder))

    path = ga / "metrics.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(bench.ServeError, match="requests.json"):
        bench.measure_demo(folder)
    shutil.rmtree(folder / "models" / "retrained")
    with pytest.raises(bench.ServeError, match=re.escape(str(folder / "models" / "retrained"))):
        bench.measure_demo(folder)
    assert bench.main(["--demo", str(folder)]) == 2
