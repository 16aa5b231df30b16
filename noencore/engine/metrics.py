"""Run metrics: one JSON line per step, and a plot of forget/remain loss over steps."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class MetricsLog:
    """Append-only JSONL of step records; on resume, records past the checkpoint are cut."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict]:
    """The step records of a ``metrics.jsonl``, one JSON object per line (blank lines
    skipped); a line that is not one is refused with the file and the line named."""
    from noencore.errors import NoencoreError

    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise NoencoreError(f"{path}: line {i} is not JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise NoencoreError(f"{path}: line {i} is not a JSON object")
        records.append(rec)
    return records


def plot_losses(metrics_path: Path, out_png: Path) -> Path:
    """Plot forget and remain token NLL over steps (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("forget_nll", "forget NLL"), ("remain_nll", "remain NLL")):
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("token NLL (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=Path(out_png).parent, prefix=".plot.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return Path(out_png)
