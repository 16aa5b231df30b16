"""Run every benchmark ratio script and record the results with the machine.

Each ``benchmarks/*_ratios.py`` measures the engine and its baseline in the same run
and prints a Markdown table of ratios (and physical floors). This script runs them
one after the other (they compete for the same cores otherwise), shows their output
and writes ``benchmarks/RESULTS.md`` (atomically), one section per script, headed by
the machine they ran on.

    python benchmarks/run_all.py                 # all
    python benchmarks/run_all.py ops shards      # a subset, by name prefix
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f"CPU: {cpu}, {os.cpu_count()} logical cores"
    if torch.cuda.is_available():
        dev += f"; GPU: {torch.cuda.get_device_name(0)}"
    return (f"{dev}; torch {torch.__version__}; Python {platform.python_version()}; "
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC")


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("*_ratios.py"))
    if argv:
        scripts = [s for s in scripts if any(s.name.startswith(a) for a in argv)]
    machine = machine_description()
    sections, failed = [], []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            failed.append(script.name)
            continue
        sections.append(f"## {script.stem.replace('_ratios', '')}\n\n"
                        f"`python benchmarks/{script.name}`\n\n{proc.stdout.strip()}\n")
    out = HERE / "RESULTS.md"
    old = out.read_text() if out.exists() else ""
    text = _merge(old, machine, sections)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _merge(old: str, machine: str, sections: list[str]) -> str:
    """Replace the sections that were re-run; keep the others (e.g. GPU runs)."""
    header = "# Benchmark results\n\nEach section: the engine against its baseline, measured in the same run.\n"
    kept: dict[str, str] = {}
    for block in old.split("\n## ")[1:]:
        kept[block.split("\n", 1)[0].strip()] = "## " + block.rstrip() + "\n"
    for s in sections:
        name = s.split("\n", 1)[0][3:].strip()
        kept[name] = s.replace("\n\n", f"\n\nMachine: {machine}\n\n", 1)
    return header + "\n" + "\n".join(kept[k] for k in sorted(kept))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
