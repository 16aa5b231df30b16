"""The time to serve an opt-out request, against retraining without the forget set.

    .venv/bin/python benchmarks/time_to_serve.py [--demo demo_out] [--out time_to_serve.md]
        [--request-method match | --request-tokens N] [--model large] [--gpus 8]
        [--peak-tflops 989] [--mfu 0.4] [--window-seconds 30] [--corpus-hours 20000]
        [--epochs 1]

Reads a finished demo (``noencore demo --out DIR``): each unlearning run in
``DIR/models/<method>/`` (every folder but ``memorised`` and ``retrained``) and the
retrained model's run in ``DIR/models/retrained/`` (the memorised model's training
repeated from its start without the forget set: what a request costs without
unlearning). Prints one Markdown table, a row per run, and an extrapolation to a larger
model on one multi-GPU node; ``--out FILE`` also writes the table to FILE and every
number to FILE with the suffix ``.json``.

Measured (as the runs recorded them, on the machine that ran the demo):

- steps: the optimizer steps until the run stopped (the lines of ``metrics.jsonl``), and
  why it stopped: the request record the run saved with its model
  (``model/requests.json``), or, for a run that records no request (the retrained
  model's fine-tuning), ``max_steps`` when it ran the ``steps`` of its ``config.json``;
- step time: the sum of ``step_s`` over ``metrics.jsonl``. The engine reads a step's
  numbers in batches and gives each step of a batch the average of the time since the
  previous read, so this is the training loop's time from its first step to the last
  read: the optimizer steps and what ran between them (the stop rule's checks,
  checkpoints), not the reference NLLs computed before the loop, the check and the
  checkpoint after the last read, or saving the model;
- run wall time: from the run folder's ``config.json`` (written once the model is loaded
  and the sets are built, before the reference NLLs) to the last file of the saved model
  (``model/``), by the files' modification times. Not given for a resumed run
  (``config.json`` is rewritten by the last process) or where the times span less than
  the step time (the folder was copied without its times);
- tokens: the sum of ``tokens`` over ``metrics.jsonl``, the engine's count: the (frame,
  codebook) pairs the loss reads, forget and remain rows together.

Computed (not measured): the model FLOPs of the training steps,
6 x P x tokens / n_q, where P is the LM's trainable parameters read from the saved
model (the planner's ``arch_from_checkpoint``: its config and tensor headers, nothing
loaded; the T5 encoder is frozen and not counted) and n_q its codebooks: the transformer
runs once per frame for all n_q codebooks, so tokens / n_q are the positions it trained
on, each 2P FLOPs forward and 4P backward. P counts every trainable parameter, as 6ND
does, the embedding tables too (lookups, no matmul: a large share of the demo's tiny LM,
under 1 % of MusicGen-large). Left out: attention's score and value products, the padded
positions no loss reads, and every forward pass outside the optimizer steps (the
method's reference NLLs before the first step, the stop rule's scoring of the forget set
and its non-members, target fits): the run folders do not record the tokens those passes
scored, so their FLOPs (2P per scored position) are not counted, though their time is in
the run wall time (and, for the checks between steps, in the step time). A run that
trains part of the model (``lora``, ``train_layers``) is refused: 6P per position does
not describe it.

Extrapolated, not measured: the model FLOPs of serving a request and of retraining on a
corpus for a planner architecture (MusicGen-large by default), with the same formula and
the engine's token accounting (n_q x frames - the sum of the codebook delays per window),
turned into time on ``--gpus`` GPUs at ``--peak-tflops`` (an H100's dense bf16 peak) x
``--mfu`` (an assumed model-FLOPs utilisation). The request's tokens are the demo run's
steps x its batch x one ``--window-seconds`` window (the demo's method needs as many steps
at the same batch on the large model: an assumption), or ``--request-tokens``. The
printed list names every assumption.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# threads that sleep at a barrier instead of spinning (as `noencore demo` sets)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from noencore.errors import NoencoreError  # noqa: E402

# the demo's starting models, not requests served
NOT_METHODS = ("memorised", "retrained")
H100_BF16_DENSE_TFLOPS = 989.0
FORMULA = "model FLOPs = 6 x P x tokens / n_q"


class ServeError(NoencoreError):
    """A demo folder this benchmark cannot read; the message names the file."""


# -- reading the run folders ----------------------------------------------------------------

def read_steps(path: Path) -> list[dict]:
    """The step records of a run's ``metrics.jsonl``: one JSON object per line with a
    ``step`` (1, 2, ... in order), ``tokens`` and ``step_s`` (finite numbers >= 0)."""
    if not path.is_file():
        raise ServeError(f"{path}: no metrics.jsonl (the run's step records); is this a "
                         "finished run folder?")
    from noencore.engine.metrics import read_metrics

    try:
        lines = read_metrics(path)
    except NoencoreError as exc:
        raise ServeError(str(exc)) from None
    records = []
    for i, rec in enumerate(lines, start=1):
        for key in ("step", "tokens", "step_s"):
            value = rec.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise ServeError(f"{path}: step record {i}: {key!r} is {value!r}, expected a "
                                 "finite number >= 0")
        if rec["step"] != len(records) + 1:
            raise ServeError(f"{path}: step record {i} records step {rec['step']}, "
                             f"expected step {len(records) + 1} (one line per step, in order)")
        records.append(rec)
    if not records:
        raise ServeError(f"{path}: no step recorded")
    return records


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ServeError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ServeError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ServeError(f"{path}: expected a JSON object")
    return data


def lm_arch(model_dir: Path) -> Any:
    """The planner's ``MusicGenArch`` of a saved model folder (config and tensor headers
    only; the parameter count is checked against the checkpoint's tensors)."""
    from noencore.planner import arch_from_checkpoint

    try:
        return arch_from_checkpoint(model_dir)
    except (ValueError, OSError) as exc:
        raise ServeError(f"{model_dir}: cannot count the LM's parameters ({exc})") from None


def stop_reason(run_dir: Path, config: dict, steps: int) -> tuple[str | None, str]:
    """Why the run stopped and where that was read: the request the run saved with its
    model, or the config's step count for a run that records no request."""
    from noencore.models.requests import read_requests

    model_dir = run_dir / "model"
    requests = read_requests(model_dir)
    if requests and (requests[-1].get("method") or {}).get("name") == config.get("method"):
        last = requests[-1]
        if last.get("steps") != steps:
            raise ServeError(f"{model_dir / 'requests.json'}: the last request ran "
                             f"{last.get('steps')} steps, but {run_dir / 'metrics.jsonl'} "
                             f"holds {steps}: the folder mixes two runs")
        return last.get("stopped"), "model/requests.json"
    planned = config.get("steps")
    if not isinstance(planned, int):
        raise ServeError(f"{run_dir / 'config.json'}: 'steps' is {planned!r}, expected an int")
    if steps > planned:
        raise ServeError(f"{run_dir / 'metrics.jsonl'} holds {steps} steps, more than the "
                         f"{planned} of {run_dir / 'config.json'}: the folder mixes two runs")
    if steps == planned:
        return "max_steps", "config.json steps"
    return None, "not recorded (no request record; fewer steps than config.json's)"


def run_wall(run_dir: Path, config: dict, loop_s: float) -> tuple[float | None, str]:
    """The run's wall time by file times (``config.json`` to the saved model's last
    file), or None and why not."""
    if config.get("resume"):
        return None, "resumed run: config.json holds only the last process's start"
    files = [p for p in (run_dir / "model").rglob("*") if p.is_file()]
    if not files:
        raise ServeError(f"{run_dir / 'model'}: no saved model files")
    start = (run_dir / "config.json").stat().st_mtime
    wall = max(p.stat().st_mtime for p in files) - start
    if wall < loop_s:
        return None, (f"file times span {wall:.1f} s, less than the steps' {loop_s:.1f} s: "
                      "the folder's times were not kept")
    return wall, "config.json to model/ (file times)"


def train_flops(params: int, tokens: float, n_q: int) -> float:
    """6 P per trained position; a position carries n_q of the engine's tokens."""
    return 6.0 * params * tokens / n_q


def measure_run(run_dir: Path) -> dict:
    """One run folder's steps, times, tokens and model FLOPs."""
    config = read_json(run_dir / "config.json")
    for key in ("lora", "train_layers"):
        if config.get(key) not in (None, "all"):
            raise ServeError(f"{run_dir / 'config.json'}: {key} = {config[key]!r}: the run "
                             "trains part of the model, which 6 x P x tokens / n_q does not "
                             "describe")
    records = read_steps(run_dir / "metrics.jsonl")
    steps = len(records)
    loop_s = sum(float(r["step_s"]) for r in records)
    tokens = sum(float(r["tokens"]) for r in records)
    stopped, stop_source = stop_reason(run_dir, config, steps)
    wall, wall_source = run_wall(run_dir, config, loop_s)
    arch = lm_arch(run_dir / "model")
    params = arch.n_params()
    parts = arch.param_breakdown()
    return {"name": run_dir.name, "folder": str(run_dir), "steps": steps,
            "stopped": stopped, "stop_source": stop_source,
            "batch_size": config.get("batch_size"), "frames": config.get("frames"),
            "stop_nonmembers": config.get("stop_nonmembers"),
            "stop_every": config.get("stop_every"),
            "loop_s": loop_s, "run_wall_s": wall, "run_wall_source": wall_source,
            "tokens": tokens, "n_q": arch.n_q, "positions": tokens / arch.n_q,
            "params": params, "embedding_share": parts["embeddings"] / params,
            "flops": train_flops(params, tokens, arch.n_q)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def measure_demo(demo: str | os.PathLike) -> dict:
    """Every unlearning run of a finished demo and the retrained model's run, each with
    its ratios to the retrained one."""
    models = Path(demo) / "models"
    if not models.is_dir():
        raise ServeError(f"{models}: no models folder; is {demo} a finished demo "
                         "(noencore demo --out DIR)?")
    retrained_dir = models / "retrained"
    if not retrained_dir.is_dir():
        raise ServeError(f"{retrained_dir}: missing: the demo's retrained model is the "
                         "baseline of every ratio")
    from noencore.demo.pipeline import TWIN_PREFIX  # more retrained models: no request

    methods = sorted(p.name for p in models.iterdir() if p.is_dir()
                     and p.name not in NOT_METHODS and not p.name.startswith(TWIN_PREFIX))
    if not methods:
        raise ServeError(f"{models}: no unlearning run (folders other than "
                         f"{', '.join(NOT_METHODS)})")
    retrained = measure_run(retrained_dir)
    rows = []
    for name in methods:
        row = measure_run(models / name)
        row["vs_retrained"] = {
            "loop_s": _ratio(row["loop_s"], retrained["loop_s"]),
            "run_wall_s": _ratio(row["run_wall_s"], retrained["run_wall_s"]),
            "flops": _ratio(row["flops"], retrained["flops"])}
        rows.append(row)
    retrained["vs_retrained"] = {"loop_s": 1.0, "flops": 1.0,
                                 "run_wall_s": None if retrained["run_wall_s"] is None else 1.0}
    return {"demo": str(demo), "formula": FORMULA, "methods": rows, "retrained": retrained}


# -- the extrapolation ----------------------------------------------------------------------

def window_tokens(arch: Any, frames: int) -> int:
    """The engine's tokens of one full window of ``frames`` frames: each codebook's frames
    the delay pattern leaves valid (n_q x frames - the sum of the delays)."""
    return sum(frames - d for d in arch.delays)


@dataclass(frozen=True)
class Node:
    """What the extrapolation assumes of the hardware."""

    gpus: int = 8
    peak_tflops: float = H100_BF16_DENSE_TFLOPS  # per GPU, dense bf16
    mfu: float = 0.4  # model FLOPs / (time x peak)

    @property
    def flops_per_s(self) -> float:
        return self.gpus * self.peak_tflops * 1e12 * self.mfu


def extrapolate(request_tokens: float, *, model: str = "facebook/musicgen-large",
                corpus_hours: float = 20000.0, epochs: float = 1.0,
                window_seconds: float = 30.0, node: Node = Node(),
                request_source: str = "given") -> dict:
    """The model FLOPs and the time of serving a request of ``request_tokens`` (the
    engine's tokens) and of retraining on ``corpus_hours`` of audio for ``epochs`` passes
    in ``window_seconds`` windows, for the planner's ``model``, on ``node``."""
    from noencore.planner import get_arch

    if request_tokens <= 0 or corpus_hours <= 0 or epochs <= 0 or window_seconds <= 0:
        raise ServeError("request tokens, corpus hours, epochs and window seconds must be > 0")
    if node.gpus < 1 or node.peak_tflops <= 0 or not 0 < node.mfu <= 1:
        raise ServeError("gpus must be >= 1, peak TFLOP/s > 0 and MFU in (0, 1]")
    arch = get_arch(model)
    params = arch.n_params()
    frames = round(window_seconds * arch.frame_rate)
    per_window = window_tokens(arch, frames)
    windows = corpus_hours * 3600.0 / window_seconds * epochs
    retrain_tokens = windows * per_window
    request_flops = train_flops(params, request_tokens, arch.n_q)
    retrain_flops = train_flops(params, retrain_tokens, arch.n_q)
    rate = node.flops_per_s
    return {
        "model": arch.name, "params": params, "n_q": arch.n_q,
        "flops_per_position": 6.0 * params, "window_seconds": window_seconds,
        "window_frames": frames, "window_tokens": per_window,
        "request_tokens": request_tokens, "request_source": request_source,
        "request_flops": request_flops, "request_s": request_flops / rate,
        "corpus_hours": corpus_hours, "epochs": epochs, "retrain_tokens": retrain_tokens,
        "retrain_flops": retrain_flops, "retrain_s": retrain_flops / rate,
        "ratio": request_flops / retrain_flops,
        "gpus": node.gpus, "peak_tflops": node.peak_tflops, "mfu": node.mfu,
        "flops_per_s": rate,
        "assumptions": [
            f"P = {params:,} trainable LM parameters of {arch.name} (the planner's shapes: "
            f"dim {arch.dim}, {arch.num_layers} layers, {arch.n_q} codebooks of "
            f"{arch.card}; the T5 encoder frozen, not counted)",
            f"{FORMULA} for both, as in the measured table: 6P = {6.0 * params:.3g} FLOPs "
            "per position; attention's score and value products left out",
            f"a {window_seconds:g} s window is {frames} frames, {per_window:,} tokens "
            f"(n_q x frames - the sum of the delays {tuple(arch.delays)}, as the engine "
            "counts them); every window full, no padding",
            f"the request: {request_source}",
            f"retraining: {corpus_hours:g} hours of audio, {epochs:g} pass(es), all of it "
            "in full windows (one pass is a floor: a model's original training usually "
            "passes over its corpus many times)",
            f"{node.gpus} GPUs at {node.peak_tflops:g} TFLOP/s each (dense bf16 peak of "
            f"an H100 SXM) x MFU {node.mfu:g} (assumed, not measured) = "
            f"{rate / 1e15:.3g} PFLOP/s sustained, for serving and retraining alike",
            "not counted for the request: the stop rule's and the reference NLLs' forward "
            "passes, loading, checkpoints and saving; for retraining: its evaluations; "
            "for both: the T5 text encoder (frozen, its outputs cached) and the codec "
            "(tokens precomputed); that the step fits in the node's memory is assumed "
            "(noencore plan checks it)",
        ],
    }


def demo_request(result: dict, method: str, model: str, window_seconds: float
                 ) -> tuple[float, str]:
    """A request's tokens for ``model`` from the demo run of ``method``: its steps x its
    batch x one full ``window_seconds`` window of ``model``."""
    from noencore.planner import get_arch

    rows = {r["name"]: r for r in result["methods"]}
    if method not in rows:
        raise ServeError(f"{result['demo']}: no run of {method!r} to size the request from "
                         f"(runs: {', '.join(rows)}); give --request-method or "
                         "--request-tokens")
    row = rows[method]
    if not isinstance(row["batch_size"], int) or row["batch_size"] < 1:
        raise ServeError(f"{row['folder']}/config.json: batch_size is {row['batch_size']!r}")
    arch = get_arch(model)
    per_window = window_tokens(arch, round(window_seconds * arch.frame_rate))
    tokens = row["steps"] * row["batch_size"] * per_window
    why = (f"{tokens:,} tokens = the demo's {method} run's {row['steps']} steps x "
           f"{row['batch_size']} windows x {per_window:,} tokens per {window_seconds:g} s "
           f"window (assumes {arch.name} stops after as many steps at the same batch as "
           f"the demo's {row['params']:,}-parameter LM on {row['frames']}-frame windows)")
    return float(tokens), why


# -- output ---------------------------------------------------------------------------------

def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def format_table(result: dict) -> str:
    """The measured table, its formula and its notes (Markdown)."""
    lines = [f"### Time to serve a request vs retraining ({result['demo']})", "",
             "| run | stopped | steps | tokens | step time s | run wall s | model FLOPs | "
             "step time / retrained | wall / retrained | FLOPs / retrained |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for row in [*result["methods"], result["retrained"]]:
        name = row["name"] + (" (gold standard)" if row is result["retrained"] else "")
        stopped = row["stopped"] or "not recorded"
        if row["stop_source"] != "model/requests.json":
            stopped += "*"
            notes.append(f"{row['name']}: stop reason from {row['stop_source']}")
        if row["run_wall_s"] is None:
            notes.append(f"{row['name']}: no run wall time: {row['run_wall_source']}")
        r = row["vs_retrained"]
        lines.append(
            f"| {name} | {stopped} | {row['steps']} | {row['tokens']:,.0f} | "
            f"{row['loop_s']:.1f} | {_num(row['run_wall_s'], '.1f')} | {row['flops']:.3g} | "
            f"{_num(r['loop_s'], '.3g')} | {_num(r['run_wall_s'], '.3g')} | "
            f"{_num(r['flops'], '.3g')} |")
    ret = result["retrained"]
    lines += ["", f"Measured: steps, step time (sum of step_s: the training loop, stop-rule "
              "checks and checkpoints between steps included), run wall time (config.json "
              "to the saved model, file times) and tokens (the engine's count: (frame, "
              "codebook) pairs the loss reads), as the runs recorded them on the machine "
              f"that ran the demo. Computed: {FORMULA}, P the LM's trainable parameters "
              f"from the saved model ({ret['params']:,} here, {100 * ret['embedding_share']:.0f} % "
              f"of them embedding tables), n_q = {ret['n_q']} codebooks per position. Not "
              "counted: the forward passes outside the optimizer steps (reference NLLs, the "
              "stop rule's scoring, target fits): the runs do not record how many tokens "
              "they scored."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def format_extrapolation(ex: dict) -> str:
    rate = (f"{ex['gpus']} x {ex['peak_tflops']:g} TFLOP/s x MFU {ex['mfu']:g}")
    short = ex["model"].removeprefix("facebook/")
    lines = [f"### {short} on one {ex['gpus']}-GPU node: extrapolated, not measured", "",
             f"| | tokens | model FLOPs | time at {rate} |", "|---|---:|---:|---:|",
             f"| serve the request | {ex['request_tokens']:,.0f} | {ex['request_flops']:.3g} | "
             f"{_duration(ex['request_s'])} |",
             f"| retrain ({ex['corpus_hours']:g} h of audio, {ex['epochs']:g} pass(es)) | "
             f"{ex['retrain_tokens']:,.0f} | {ex['retrain_flops']:.3g} | "
             f"{_duration(ex['retrain_s'])} |",
             f"| request / retrain | | {ex['ratio']:.3g} | {ex['ratio']:.3g} |", "",
             "Assumptions:"]
    lines += [f"- {a}" for a in ex["assumptions"]]
    return "\n".join(lines)


def write_outputs(out: Path, text: str, data: dict) -> Path:
    """``out`` (Markdown) and ``out`` with the suffix ``.json``, each written atomically."""
    from noencore.fileio import atomic_write

    if out.suffix == ".json":
        raise ServeError(f"{out}: give the Markdown file's name; the JSON goes beside it "
                         "with the suffix .json")
    json_path = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, (text + "\n").encode())
    atomic_write(json_path, (json.dumps(data, indent=1) + "\n").encode())
    return json_path


def main(argv: list[str] | None = None) -> int:
    from noencore.demo import DEFAULT_METHOD

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--demo", default="demo_out", help="a finished demo's folder")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the tables to this Markdown file and every number to "
                         "it with the suffix .json")
    ap.add_argument("--request-method", default=DEFAULT_METHOD,
                    help="the demo run whose steps and batch size give the extrapolated "
                         "request's tokens")
    ap.add_argument("--request-tokens", type=float, default=None,
                    help="the extrapolated request's tokens (the engine's count), in place "
                         "of --request-method's")
    ap.add_argument("--model", default="facebook/musicgen-large",
                    help="the planner's architecture to extrapolate to")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the node")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="each GPU's peak FLOP/s, in TFLOP/s (an H100's dense bf16)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
    ap.add_argument("--window-seconds", type=float, default=30.0,
                    help="training window of the extrapolated model")
    ap.add_argument("--corpus-hours", type=float, default=20000.0,
                    help="audio the retrained model trains on")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the corpus")
    a = ap.parse_args(argv)
    try:
        result = measure_demo(a.demo)
        if a.request_tokens is not None:
            tokens, why = a.request_tokens, f"{a.request_tokens:,.0f} tokens (given)"
        else:
            tokens, why = demo_request(result, a.request_method, a.model, a.window_seconds)
        result["extrapolation"] = extrapolate(
            tokens, model=a.model, corpus_hours=a.corpus_hours, epochs=a.epochs,
            window_seconds=a.window_seconds, request_source=why,
            node=Node(gpus=a.gpus, peak_tflops=a.peak_tflops, mfu=a.mfu))
        text = format_table(result) + "\n\n" + format_extrapolation(result["extrapolation"])
        print(text)
        if a.out is not None:
            json_path = write_outputs(a.out, text, result)
            print(f"\nwrote {a.out} and {json_path}")
    except NoencoreError as exc:
        print(f"time_to_serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
