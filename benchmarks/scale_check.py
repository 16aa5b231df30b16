"""Scale rehearsal at real shapes, one command: ``make scale-check``.

MusicGen-small's LM with every real dimension (24 layers of width 1024, 16 heads, K=4
codebooks of 2048, cross-attention on T5-base-wide conditions; ``musicgen-small-random``:
random weights) and the full-size 32 kHz EnCodec (``musicgen-32khz``, random weights), on
a few real-length clips (30-70 s; mono and stereo, four sample rates, four formats):

1. synthesise the clips and their manifest (an opt-out artist's tracks: the forget set,
   and two of its tracks never trained on: the stop rule's non-members; two remain tracks
   by other artists);
2. ``noencore precompute`` with the full-size codec, then ``noencore condition``;
3. the planner's memory per rank for the configuration below (``noencore.planner``);
4. ``noencore unlearn`` under ``deepspeed --num_gpus 2`` on 2 CPU ranks: ZeRO-3,
   activation checkpointing, 2 micro-batches of one 30 s window per rank and step (global
   batch 4), the membership-inference stop rule checked after every step, a checkpoint
   after every step. The run is killed (SIGKILL to the launcher's process group: a node
   failure) once its first checkpoint is committed, then resumed with ``torchrun
   --nproc_per_node 2 ... --resume`` and finished;
5. the resumed run's metrics and checkpoints are checked (steps continue, the newest
   checkpoint verifies), the saved folder is loaded with audiocraft's
   ``MusicGen.get_pretrained`` and generates a second of audio;
6. a table: each rank's measured peak memory next to the planner's, and the seconds per
   step; ``WORK/summary.json`` and ``WORK/summary.md`` (``--results`` also writes it as
   the ``scale`` section of ``benchmarks/RESULTS.md``).

Memory is measured inside each rank by a small driver (this file, run by the launcher
with ``rank``) that wraps the loop's phases (model load, DeepSpeed set-up, each step,
stop-rule check, checkpoint, ...) and reads ``/proc/self/status``, resetting the peak
(``VmHWM``) at the start of each phase. The figure compared with the planner is the
phase's peak resident memory minus what a GPU would not hold: the rank's resident
memory before the model is built (interpreter, libraries) and the parts the engine
keeps in host memory on a GPU node too (the codec and audiocraft's copy of the frozen
text encoder). The engine runs unchanged.

    python benchmarks/scale_check.py [--work .cache/scale_check] [--steps 3] [--results]
    python benchmarks/scale_check.py --report [--work ...]   # the summary again, nothing run
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "musicgen-small-random"  # noencore.models.musicgen's named config
PLAN_MODEL = "facebook/musicgen-small"  # the same architecture, as the planner names it
CODEC = "musicgen-32khz"
RANKS = 2
FRAMES = 1500  # 30 s windows, as MusicGen trains
MICRO_BATCH, ACCUMULATION = 1, 2
NONMEMBERS = "valid_optout"
GIB, MIB = 2**30, 2**20
# (split, seconds, sample rate, stereo, format): the opt-out artist's forget tracks and
# its never-trained tracks (the stop rule's non-members), then two other artists' tracks
# (each 30 s is one training window; the stop rule scores every forget and non-member
# window after every step, so those are kept to 3 and 2 windows)
CLIPS = (
    ("forget", 60.0, 44100, True, "flac"),
    ("forget", 30.0, 32000, False, "wav"),
    (NONMEMBERS, 30.0, 48000, False, "flac"),
    (NONMEMBERS, 30.0, 22050, True, "wav"),
    ("remain", 70.0, 48000, True, "mp3"),
    ("remain", 50.0, 16000, False, "ogg"),
)


# ----------------------------------------------------------------------------- rank side

def _status() -> dict[str, int]:
    """This process's memory counters from /proc/self/status, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


class _Probe:
    """Per-phase peak resident memory of this rank, written to a JSON file after every
    phase (so a killed run leaves what it measured). Phases nest (a step holds forward,
    backward and optimizer phases): an inner phase's start saves the outer phase's peak so
    far before the counter is reset, and hands its own peak back to it at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"rank": int(os.environ.get("RANK", "0")), "phases": [],
                                     "checks": []}
        self.step = 0  # the step being trained, or the last one trained
        self._open: list[dict] = []

    def flush(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)

    def phase(self, name: str, fn, step_arg: int | None = None):
        """``fn`` wrapped as phase ``name``; ``step_arg``: the index of ``fn``'s argument
        holding the 0-based step it trains."""
        def wrapped(*args, **kwargs):
            if step_arg is not None:
                self.step = int(args[step_arg]) + 1
            before = _status()
            if self._open:
                self._open[-1]["peak"] = max(self._open[-1]["peak"], before["VmHWM"])
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            rec = {"phase": name, "step": self.step, "t0": time.time(),
                   "rss_start": before["VmRSS"], "peak": before["VmRSS"]}
            self._open.append(rec)
            try:
                return fn(*args, **kwargs)
            finally:
                after = _status()
                self._open.pop()
                rec.update(t1=time.time(), peak=max(rec["peak"], after["VmHWM"]),
                           rss_end=after["VmRSS"], file_end=after["RssFile"])
                if self._open:
                    self._open[-1]["peak"] = max(self._open[-1]["peak"], rec["peak"])
                self.data["phases"].append(rec)
                self.flush()
        return wrapped


def _host_bytes(model) -> dict[str, int]:
    """Bytes of what the engine keeps in host memory on a GPU node as well: the codec and
    the frozen T5 that audiocraft's text conditioner loads (outside the module tree)."""
    def size(mod) -> int:
        return sum(t.numel() * t.element_size() for t in (*mod.parameters(), *mod.buffers()))

    t5 = model.lm.condition_provider.conditioners[model.text_attribute].t5
    return {"codec": size(model.codec.model) if model.codec is not None else 0, "t5": size(t5),
            "lm_fp32": size(model.lm)}


def rank_main(probe_file: str, argv: list[str]) -> int:
    """One rank: measure the phases of ``noencore <argv>`` (``noencore.cli.main``)."""
    # imported before the baseline: a GPU holds none of the libraries
    import audiocraft.models.builders  # noqa: F401
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from deepspeed.runtime.engine import DeepSpeedEngine

    import noencore.models
    import noencore.ops  # noqa: F401
    from noencore.engine import loop, stopping, zero

    probe = _Probe(Path(probe_file))
    load = noencore.models.load_musicgen

    def load_measured(*args, **kwargs):
        probe.data["base_rss"] = _status()["VmRSS"]
        model = load(*args, **kwargs)
        probe.data["host_bytes"] = _host_bytes(model)
        probe.flush()
        return model

    noencore.models.load_musicgen = probe.phase("load model", load_measured)
    zero.initialize = probe.phase("deepspeed init", zero.initialize)
    loop._reference_nll = probe.phase("reference NLL", loop._reference_nll)
    loop._load_resume_state = probe.phase("resume load", loop._load_resume_state)
    loop._train_step = probe.phase("step", loop._train_step, step_arg=1)
    # inside a step, per micro-batch: the planner's two moments (the end of the forward,
    # the backward) and the optimizer's update at the accumulation boundary
    DeepSpeedEngine.forward = probe.phase("forward", DeepSpeedEngine.forward)
    DeepSpeedEngine.backward = probe.phase("backward", DeepSpeedEngine.backward)
    DeepSpeedEngine.step = probe.phase("optimizer", DeepSpeedEngine.step)
    loop._save_checkpoint = probe.phase("checkpoint", loop._save_checkpoint)
    zero.release_fp32_model = probe.phase("gather fp32 model", zero.release_fp32_model)
    noencore.models.save_musicgen = probe.phase("save model", noencore.models.save_musicgen)
    check = stopping.NonmemberStop.check
    stopping.NonmemberStop.check = probe.phase("stop check", check)
    measure = stopping.NonmemberStop.measure

    def measure_recorded(self):
        auc, nll_f, nll_n = measure(self)
        probe.data["checks"].append({"auc": auc, "forget_nll": nll_f, "nonmember_nll": nll_n})
        return auc, nll_f, nll_n

    stopping.NonmemberStop.measure = measure_recorded
    from noencore.cli import main

    return main(argv)


# ------------------------------------------------------------------------ orchestration

def _say(text: str) -> None:
    print(f"[scale-check] {text}", flush=True)


def _env(work: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // RANKS)),
           "MPLBACKEND": "Agg"}
    env.setdefault("NOENCORE_CACHE", str(work / "noencore_cache"))  # the random T5 lives here
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    # A fixed mmap threshold: every block of 64 KiB or more is its own mapping, returned to
    # the system when the tensor is freed. With glibc's default (a threshold that grows to
    # 32 MB), freed blocks stay in its heap and the resident memory tracks past allocations
    # rather than live tensors (about 1 GiB more per rank after DeepSpeed's set-up here).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` to completion, its output in ``log`` (its last line shown); seconds taken."""
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed (exit {proc.returncode}); see {log}")
    _say("    " + (lines[-1] if lines else "(no output)"))
    return time.time() - t0


def make_corpus(folder: Path) -> Path:
    """The rehearsal's clips and manifest (deterministic; kept when already written)."""
    import numpy as np

    from noencore.demo.corpus import OPT_OUT_ARTIST, OTHER_ARTISTS, caption_for, render_clip
    from noencore.fileio import sha256_file

    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (split, seconds, sr, stereo, fmt) in enumerate(CLIPS):
        style = OPT_OUT_ARTIST if split != "remain" else OTHER_ARTISTS[i % len(OTHER_ARTISTS)]
        rel = f"audio/clip-{i}.{fmt}"
        meta = render_clip(folder / rel, style, seconds, sr, np.random.default_rng([7, i]),
                           stereo=stereo, fmt=fmt)
        records.append({"id": f"clip-{i}", "path": rel, "caption": caption_for(style, meta),
                        "split": split, "artist": style.name, "seconds": seconds,
                        "sample_rate": sr, "channels": 2 if stereo else 1, "format": fmt,
                        "sha256": sha256_file(folder / rel)})
    tmp = manifest.with_name(".manifest.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, manifest)
    return manifest


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unlearn_flags(work: Path, steps: int) -> list[str]:
    return ["unlearn", "--model", MODEL, "--shards", str(work / "shards"),
            "--forget", "forget", "--remain", "remain", "--method", "graddiff",
            "--stop-nonmembers", NONMEMBERS, "--stop-auc", "0.0",
            "--steps", str(steps), "--lr", "1e-6", "--batch-size", str(RANKS * MICRO_BATCH * ACCUMULATION),
            "--accumulation", str(ACCUMULATION), "--frames", str(FRAMES), "--zero-stage", "3",
            "--checkpointing", "--checkpoint-every", "1", "--out", str(work / "run"),
            "--no-progress", "--device", "cpu"]


def _launch(launcher: str, work: Path, probe: str, flags: list[str], port: int) -> list[str]:
    rank = [str(Path(__file__).resolve()), "rank", "--probe", str(work / "probes" / probe), "--"]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(RANKS),
                "--master_port", str(port), *rank, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
            "--master_port", str(port), *rank, *flags]


def run_killed(work: Path, env: dict[str, str], steps: int, kill_after: int) -> dict:
    """The first run, under ``deepspeed``: SIGKILLed (its whole process group) as soon as
    checkpoint ``kill_after`` is committed."""
    from noencore.engine.checkpoint import checkpoint_dir

    marker = checkpoint_dir(work / "run" / "checkpoints", kill_after) / "manifest.json"
    port = _free_port()
    cmd = _launch("deepspeed", work, "killed-rank{rank}.json", _unlearn_flags(work, steps), port)
    t0 = time.time()
    with open(work / "logs" / "unlearn-killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        while proc.poll() is None and not marker.exists():
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"the run ended (exit {proc.returncode}) before checkpoint "
                             f"{kill_after}; see {work / 'logs' / 'unlearn-killed.log'}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the shared-memory buffers of DeepSpeed's CPU collectives, which only a clean exit removes
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)
    return {"launcher": "deepspeed", "killed_at_s": time.time() - t0, "exit": proc.returncode,
            "killed_after_checkpoint": kill_after}


def run_resumed(work: Path, env: dict[str, str], steps: int) -> dict:
    """The same run resumed under ``torchrun``. A rank may abort at exit after all its work
    is done (a known DeepSpeed-on-CPU issue), so success is read from what the run wrote."""
    cmd = _launch("torchrun", work, "resumed-rank{rank}.json",
                  [*_unlearn_flags(work, steps), "--resume"], _free_port())
    t0 = time.time()
    log = work / "logs" / "unlearn-resumed.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    summary = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"steps"')]
    if not summary:
        raise SystemExit(f"the resumed run wrote no summary (exit {proc.returncode}); see {log}")
    return {"launcher": "torchrun", "seconds": time.time() - t0, "exit": proc.returncode,
            "summary": summary[0]}


def check_run(work: Path, steps: int, kill_after: int) -> dict:
    """What the killed-and-resumed run left: metrics of steps 1..N, the newest checkpoint
    verifies and was made by this configuration."""
    from noencore.engine import checkpoint as ckpt
    from noencore.engine.metrics import read_metrics

    run = work / "run"
    recs = read_metrics(run / "metrics.jsonl")
    found = ckpt.latest_verified(run / "checkpoints")
    problems = []
    if [r["step"] for r in recs] != list(range(1, len(recs) + 1)):
        problems.append(f"metrics steps {[r['step'] for r in recs]} do not continue 1..N")
    if found is None:
        problems.append("no checkpoint verifies")
    elif int(found[1]["step"]) != len(recs):
        problems.append(f"newest checkpoint is step {found[1]['step']}, metrics end at {len(recs)}")
    if found is not None and (found[1]["run"]["world"], found[1]["run"]["zero"]) != (RANKS, 3):
        problems.append(f"checkpoint made by world {found[1]['run']['world']}, ZeRO {found[1]['run']['zero']}")
    if not (run / "model" / "state_dict.bin").exists():
        problems.append("no saved model folder")
    leftovers = sorted(p.name for p in (run / "checkpoints").glob(".tmp-*"))
    return {"steps": [r["step"] for r in recs], "records": recs, "problems": problems,
            "newest_checkpoint": None if found is None else found[0].name,
            "temporary_folders_left": leftovers, "resumed_from": kill_after}


def reload_and_generate(work: Path, caption: str) -> dict:
    """The saved folder through audiocraft's own loader, one second of audio."""
    import soundfile as sf
    import torch

    from noencore.models.musicgen import text_encoder_name
    from noencore.models.text import register_t5

    folder = work / "run" / "model"
    t5 = text_encoder_name(str(folder))
    register_t5(t5, json.loads((Path(t5) / "config.json").read_text())["d_model"])
    from audiocraft.models import MusicGen

    t0 = time.time()
    mg = MusicGen.get_pretrained(str(folder), device="cpu")
    loaded = time.time() - t0
    mg.set_generation_params(duration=1.0)
    torch.manual_seed(0)
    t0 = time.time()
    wav = mg.generate([caption])
    took = time.time() - t0
    ok = wav.shape[:2] == (1, 1) and wav.shape[-1] == mg.sample_rate and bool(torch.isfinite(wav).all())
    sf.write(work / "generated.wav", wav[0, 0].numpy(), mg.sample_rate)
    return {"shape": list(wav.shape), "sample_rate": mg.sample_rate, "finite_and_shaped": ok,
            "rms": float(wav.pow(2).mean().sqrt()), "load_s": loaded, "generate_s": took,
            "lm_params": sum(p.numel() for p in mg.lm.parameters()), "caption": caption}


# ----------------------------------------------------------------------------- report

def predicted(text_tokens: int) -> dict:
    """The planner's answer for the rehearsal's configuration (ZeRO-3, 2 GPUs, micro-batch
    1, accumulation 2, checkpointing, the stop rule, the C++ backend of the fused op that
    the CPU runs, the engine's DeepSpeed config) at each moment of a step, as a CPU rank
    holds it (``device="cpu"``: torch AdamW's single-tensor update, the written part of the
    reduction bucket) and without the 2 GiB reserve, which stands for a CUDA context, NCCL
    workspaces and fragmentation that a CPU rank measured this way does not have."""
    from noencore.planner import plan_memory

    row = plan_memory(PLAN_MODEL, gpus=RANKS, gpu_mem_gib=80, micro_batch=MICRO_BATCH,
                      accumulation=ACCUMULATION, seconds=FRAMES / 50, reserve_gib=0.0, stop_rule=True,
                      checkpointing=True, backend="cpp", text_tokens=text_tokens, stages=(3,),
                      device="cpu")[0]
    terms = {k: getattr(row, k) for k in ("params", "grads", "optim", "activations", "loss", "update",
                                          "buckets", "other")}
    return {"terms": terms, "total": row.total, "peak": row.peak,
            "planner": {k: row.moments[k] for k in ("between", "forward", "backward", "update")}}


TRAINING_PHASES = ("reference NLL", "resume load", "step", "stop check", "checkpoint")


def rank_memory(probe: dict) -> dict:
    """One rank's peaks less the resident memory a GPU would not hold (bytes): per phase,
    over training, and the moments of the run's last step."""
    off = probe["base_rss"] + sum(v for k, v in probe["host_bytes"].items() if k != "lm_fp32")
    phases = [{**p, "peak": p["peak"] - off, "rss_start": p["rss_start"] - off}
              for p in probe["phases"]]
    by_name: dict[str, int] = {}
    for p in phases:
        by_name[p["phase"]] = max(by_name.get(p["phase"], 0), p["peak"])
    training = [p for p in phases if p["phase"] in TRAINING_PHASES]
    top = max(training, key=lambda p: p["peak"]) if training else None
    steps = [p for p in phases if p["phase"] == "step"]
    last = max((p["step"] for p in steps), default=None)

    def at_last(name: str) -> int | None:
        got = [p["peak"] for p in phases if p["phase"] == name and p["step"] == last]
        return max(got) if got else None

    return {"offset": off, "phases": by_name,
            "training_peak": top["peak"] if top else None,
            "training_peak_phase": f"{top['phase']} {top['step']}" if top else None,
            "last_step": last,
            "moments": {"between": next((p["rss_start"] for p in steps if p["step"] == last), None),
                        "forward": at_last("forward"), "backward": at_last("backward"),
                        "update": at_last("optimizer"), "step": at_last("step")}}


def step_seconds(probes: dict) -> dict[int, float]:
    """Seconds of each trained step (rank 0's ``step`` phase, killed and resumed runs; a
    step the killed run began but did not finish is left out)."""
    out: dict[int, float] = {}
    for run in ("killed", "resumed"):
        first = probes[run][0] if probes[run] else None
        for p in (first or {}).get("phases", []):
            if p["phase"] == "step":
                out[p["step"]] = p["t1"] - p["t0"]
    return out


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report(result: dict) -> str:
    """The Markdown summary of a rehearsal. The planner's figures are computed here, by the
    current planner, from the rehearsal's configuration (``text_tokens``); where the planner
    recorded at the time of the run (``result["plan"]``) differs, its total is given too."""
    pred, mem = predicted(result["text_tokens"]), result["memory"]
    recorded = (result.get("plan") or {}).get("total")
    last = [m for m in mem["resumed"] if m]
    n_last = last[0]["last_step"] if last else None
    lr = _unlearn_flags(Path("."), 0)
    lines = [
        f"Model `{MODEL}`: MusicGen-small's LM ({result['lm_params'] / 1e6:.1f} M parameters, every "
        f"real dimension, random weights); codec `{CODEC}` (full size, random weights); T5-base-wide "
        f"conditions ({result['text_tokens']} tokens per caption). {len(CLIPS)} clips of "
        f"{min(c[1] for c in CLIPS):.0f}-{max(c[1] for c in CLIPS):.0f} s ({sum(c[1] for c in CLIPS):.0f} s "
        f"of audio; mono and stereo, {min(c[2] for c in CLIPS) / 1000:g}-{max(c[2] for c in CLIPS) / 1000:g} "
        f"kHz, {'/'.join(dict.fromkeys(c[4] for c in CLIPS))}), {result['windows']} windows of 30 s.",
        "",
        f"Unlearning: {RANKS} CPU ranks (one thread each), DeepSpeed ZeRO-3 in bf16, activation "
        f"checkpointing, micro-batch {MICRO_BATCH} x {ACCUMULATION} accumulation (global batch "
        f"{RANKS * MICRO_BATCH * ACCUMULATION}), graddiff at lr {lr[lr.index('--lr') + 1]}, the stop rule "
        f"measured after every step (target AUC 0: with random weights the attack's AUC means nothing, "
        f"so the rule measures without ending the rehearsal), a checkpoint after every step; "
        f"{result['steps']} steps, the `deepspeed` run killed after checkpoint {result['kill_after']}, "
        f"resumed with `torchrun`.",
        "",
        "Memory per rank, GiB. Measured: the peak resident memory of the moment less the rank's memory "
        "before the model is built (interpreter, libraries) and less the codec and audiocraft's copy of "
        "the T5 (host memory on a GPU node too); glibc returns every block of 64 KiB or more when it is "
        "freed (`MALLOC_MMAP_THRESHOLD_`), so the figure follows live tensors. Planner: `noencore plan "
        "--model small --gpus 2 --micro-batch 1 --accumulation 2 --checkpointing --stop-rule --backend "
        f"cpp --text-tokens {result['text_tokens']}`, ZeRO-3 row, as a CPU rank holds it "
        "(`noencore.planner.plan_memory(..., device=\"cpu\", reserve_gib=0)`: torch AdamW's single-tensor "
        "update and the written part of the reduction bucket; no 2 GiB reserve for a CUDA context).",
        "",
        f"| moment of step {n_last} (resumed run, every state present) | planner | rank 0 | rank 1 "
        "| rank 0 / planner |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = (("between steps: weights, gradients, AdamW, stop-rule copy, reduction bucket", "between"),
            ("end of the forward (inside the loss; ZeRO-3's gathered weights)", "forward"),
            ("backward (+ the reduction's flat copy of its bucket)", "backward"),
            ("optimizer update (fp32 gradient partition, AdamW temporaries)", "update"))
    for label, key in rows:
        cells = [_gib(m["moments"][key]) if m else "-" for m in mem["resumed"]]
        got = last[0]["moments"][key] if last else None
        plan = pred["planner"][key]
        lines.append(f"| {label} | {_gib(plan)} | {' | '.join(cells)} | {_ratio(got, plan)} |")
    got = last[0]["moments"]["step"] if last else None
    cells = [_gib(m["moments"]["step"]) if m else "-" for m in mem["resumed"]]
    lines.append(f"| **step peak** (planner: its total, at the {pred['peak']}) | **{_gib(pred['total'])}** | "
                 f"{' | '.join(cells)} | **{_ratio(got, pred['total'])}** |")
    t = pred["terms"]
    lines += [
        "", f"Planner columns at its peak (the {pred['peak']}), GiB: "
        + ", ".join(f"{k} {v / GIB:.2f}" for k, v in t.items()) + f"; total {pred['total'] / GIB:.2f}."]
    if recorded and recorded != pred["total"]:
        lines.append(f"The planner figures above are computed from this configuration by the current planner; "
                     f"the planner recorded with the run (an earlier version) predicted {_gib(recorded)} GiB "
                     f"(measured / that: {_ratio(got, recorded)}).")
    lines += [
        "", "Peak over each run's training (steps, stop-rule checks, checkpoints, resume), GiB:", "",
        "| run | rank | planner total | measured | measured / planner | where |",
        "|---|---|---:|---:|---:|---|"]
    for run in ("killed", "resumed"):
        for r, m in enumerate(mem[run]):
            if m and m["training_peak"] is not None:
                lines.append(f"| {run} | {r} | {_gib(pred['total'])} | {_gib(m['training_peak'])} | "
                             f"{_ratio(m['training_peak'], pred['total'])} | {m['training_peak_phase']} |")
    names: list[str] = []
    for run in ("killed", "resumed"):
        for m in mem[run]:
            names += [k for k in (m or {}).get("phases", {}) if k not in names]
    lines += ["", "Peak of each phase, GiB (rank 0 / rank 1; step 1 runs before AdamW has its states, "
              "the first check makes the stop rule's copy):", "",
              "| phase | killed run | resumed run |", "|---|---|---|"]
    for name in names:
        cells = [" / ".join(_gib((m or {}).get("phases", {}).get(name)) for m in mem[run])
                 for run in ("killed", "resumed")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    recs = result["run"]["records"]
    step_s = step_seconds(result["probes"])
    lines += ["", "| step | run | seconds | tokens/s | forget NLL | remain NLL |", "|---|---|---:|---:|---:|---:|"]
    for r in recs:
        run = "killed" if r["step"] <= result["kill_after"] else "resumed"
        sec = step_s.get(r["step"])
        lines.append(f"| {r['step']} | {run} | {_num(sec, '.1f')} | "
                     f"{_num(r['tokens'] / sec if sec else None, '.0f')} | "
                     f"{r['forget_nll']:.4f} | {r['remain_nll']:.4f} |")
    secs = sorted(step_s.values())
    checks = [c for m in result["probes"]["killed"][:1] + result["probes"]["resumed"][:1] if m
              for c in m["checks"]]
    check_s = [p["t1"] - p["t0"] for m in result["probes"]["killed"][:1] + result["probes"]["resumed"][:1]
               if m for p in m["phases"] if p["phase"] == "stop check"]
    timed = [r for r in recs if r["step"] in step_s]
    lines += ["", f"Seconds per step (rank 0's wall time of the engine's step: {ACCUMULATION} micro-batches "
                  f"of one 30 s window per rank, forward, backward with recomputation, ZeRO-3 gathers "
                  f"and reductions, the update; not the stop-rule check or the checkpoint): median "
                  f"{secs[len(secs) // 2]:.1f} (min {secs[0]:.1f}, max {secs[-1]:.1f}); "
                  f"{sum(r['tokens'] for r in timed) / sum(step_s[r['step']] for r in timed):.0f} "
                  "tokens/s over all steps (both ranks' tokens).",
              f"Stop-rule checks: {len(checks)} ("
              + ", ".join(f"AUC {c['auc']:.2f}, forget NLL {c['forget_nll']:.3f} vs non-members "
                          f"{c['nonmember_nll']:.3f}" for c in checks)
              + (f"; {sum(check_s) / len(check_s):.0f} s each" if check_s else "") + ").",
              f"Kill/resume: {result['kill']['summary']}.",
              f"Generation: {result['generation']['summary']}.",
              "Stages, seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items())
              + f" (load average {result['load_average']})."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "rank" in argv[:2]:
        # a rank under a launcher: rank --probe FILE -- NOENCORE ARGS, with the deepspeed
        # launcher's --local_rank=N put in front
        from noencore.cli import take_local_rank

        argv = take_local_rank(argv)
        if argv[:2] != ["rank", "--probe"] or len(argv) < 4 or argv[3] != "--":
            raise SystemExit(f"rank mode: expected rank --probe FILE -- ARGS, got {argv[:4]}")
        return rank_main(argv[2].format(rank=os.environ.get("RANK", "0")), argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".cache" / "scale_check"),
                    help="work folder (corpus, shards, run, logs, summary)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps in all (default 3)")
    ap.add_argument("--kill-after", type=int, default=1,
                    help="kill the first run once this checkpoint is committed (default 1)")
    ap.add_argument("--fresh", action="store_true", help="redo every stage (keeps nothing of WORK)")
    ap.add_argument("--results", action="store_true",
                    help="also write the summary as the 'scale' section of benchmarks/RESULTS.md")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: rewrite WORK/summary.md from WORK/summary.json (the planner's "
                         "figures recomputed by the current planner)")
    args = ap.parse_args(argv)
    if args.report:
        summary = Path(args.work).resolve() / "summary.json"
        if not summary.is_file():
            raise SystemExit(f"{summary}: no rehearsal here to report; run it first (make scale-check)")
        text = report(json.loads(summary.read_text()))
        _write(summary.with_suffix(".md"), text + "\n")
        print(text, flush=True)
        return 0
    if not 1 <= args.kill_after < args.steps:
        raise SystemExit("--kill-after must be at least 1 and below --steps")
    work = Path(args.work).resolve()
    if args.fresh and work.exists():
        import shutil

        shutil.rmtree(work)
    for sub in ("logs", "probes"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = _env(work)
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NOENCORE_CACHE")})
    timings: dict[str, float] = {}
    t_all = time.time()

    _say("1/6 corpus")
    t0 = time.time()
    manifest = make_corpus(work / "corpus")
    timings["corpus"] = time.time() - t0
    _say("2/6 precompute (full-size EnCodec) and text conditions")
    noencore = [sys.executable, "-m", "noencore"]
    timings["precompute"] = _run([*noencore, "precompute", str(manifest), str(work / "shards"),
                                  "--codec", CODEC, "--quiet", "--workers", "1"], env,
                                 work / "logs" / "precompute.log")
    timings["condition"] = _run([*noencore, "condition", str(work / "shards"), "--model", MODEL], env,
                                work / "logs" / "condition.log")
    from noencore.data.batches import windows
    from noencore.data.shards import TokenShards
    from noencore.models.text import ConditionCache

    shards = TokenShards(work / "shards")
    text_tokens = ConditionCache(work / "shards" / "conditions").length
    _say("3/6 plan")
    plan = predicted(text_tokens)
    _say(f"    predicted per rank: {plan['total'] / GIB:.2f} GiB (ZeRO-3, 2 ranks, micro-batch 1 x 2, "
         f"checkpointing, stop rule, {text_tokens} text tokens; no CUDA reserve)")
    need = RANKS * (plan["total"] + 1.5 * GIB)  # + interpreter, libraries, codec, T5 per rank
    free = _mem_available()
    if free < need:
        _say(f"    WARNING: {free / GIB:.1f} GiB of memory available, the ranks need about "
             f"{need / GIB:.1f}: the kernel may kill one (the run then fails)")

    _say(f"4/6 unlearn on {RANKS} CPU ranks: deepspeed, killed after checkpoint {args.kill_after}")
    import shutil

    shutil.rmtree(work / "run", ignore_errors=True)
    for old in (work / "probes").glob("*.json"):
        old.unlink()
    killed = run_killed(work, env, args.steps, args.kill_after)
    timings["run until killed"] = killed["killed_at_s"]
    time.sleep(2)  # the killed ranks are reaped by init
    left = subprocess.run(["pgrep", "-f", str(work / "probes")], capture_output=True, text=True).stdout.split()
    _say(f"    killed after {killed['killed_at_s']:.0f} s; rank processes left: {len(left)}")
    _say("    resumed under torchrun")
    resumed = run_resumed(work, env, args.steps)
    timings["resumed run"] = resumed["seconds"]
    checked = check_run(work, args.steps, args.kill_after)
    _say("5/6 audiocraft MusicGen.get_pretrained + 1 s of generation")
    t0 = time.time()
    gen = reload_and_generate(work, shards.captions[0])
    timings["reload + generate"] = time.time() - t0
    timings["total"] = time.time() - t_all

    _say("6/6 report")
    probes = {run: [json.loads(p.read_text()) if p.exists() else None
                    for p in (work / "probes" / f"{run}-rank{r}.json" for r in range(RANKS))]
              for run in ("killed", "resumed")}
    # the run goes to --steps unless the stop rule ends it (it measures AUC 0 only if every
    # forget window's NLL has passed every non-member's)
    finished = resumed["summary"]["steps"] == args.steps or resumed["summary"]["stopped"] != "max_steps"
    kill_ok = not checked["problems"] and len(left) == 0 and finished
    result = {
        "plan": plan, "text_tokens": text_tokens, "windows": int(windows(shards, FRAMES)[0].size),
        "lm_params": gen["lm_params"], "steps": args.steps, "kill_after": args.kill_after,
        "memory": {run: [rank_memory(p) if p and "base_rss" in p else None for p in probes[run]]
                   for run in probes},
        "probes": probes, "run": checked, "timings": timings,
        "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "kill": {"killed": killed, "resumed": resumed, "ok": kill_ok,
                 "summary": (f"{'ok' if kill_ok else 'FAILED'}: killed (SIGKILL, process group) "
                             f"{killed['killed_at_s']:.0f} s in, after checkpoint {args.kill_after}; "
                             f"{len(left)} rank processes left; resumed from step "
                             f"{args.kill_after} to {resumed['summary']['steps']} "
                             f"(stopped: {resumed['summary']['stopped']}, resumed launcher exit "
                             f"{resumed['exit']}); metrics steps {checked['steps']}; newest "
                             f"checkpoint {checked['newest_checkpoint']} verifies; temporary "
                             f"folders left {checked['temporary_folders_left'] or 'none'}"
                             + (f"; problems: {checked['problems']}" if checked["problems"] else ""))},
        "generation": {**gen, "summary": (
            f"{'ok' if gen['finite_and_shaped'] else 'FAILED'}: MusicGen.get_pretrained(run/model) "
            f"({gen['lm_params'] / 1e6:.1f} M LM parameters) in {gen['load_s']:.0f} s; 1 s generated "
            f"in {gen['generate_s']:.0f} s, waveform {gen['shape']} at {gen['sample_rate']} Hz, finite, "
            f"RMS {gen['rms']:.3f}; written to generated.wav")},
    }
    (work / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    text = report(result)
    _write(work / "summary.md", text + "\n")
    print("\n" + text, flush=True)
    if args.results:
        from run_all import _merge, machine_description

        out = HERE / "RESULTS.md"
        section = f"## scale\n\n`make scale-check` (`python benchmarks/scale_check.py --results`)\n\n{text}\n"
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(_merge(out.read_text() if out.exists() else "", machine_description(), [section]))
        os.replace(tmp, out)
        _say(f"wrote the scale section of {out}")
    return 0 if kill_ok and gen["finite_and_shaped"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
