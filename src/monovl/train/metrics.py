"""Training metrics: one JSON line per logged step, TensorBoard event files, and `monovl plot RUN_DIR`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir) -> list[dict]:
    """Every record of RUN_DIR/metrics.jsonl, in file order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a `monovl train` run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends records to RUN_DIR/metrics.jsonl (and TensorBoard). On resume from step k, records of later
    steps, written by the interrupted run after its last saved state, are dropped first."""

    def __init__(self, run_dir, *, resume_step: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if self.path.exists():
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot(run_dir, out: str | None = None) -> Path:
    """Draw loss and learning rate against the step to a PNG (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        raise ValueError(f"{Path(run_dir) / METRICS_FILE} has no loss records to plot")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], color="tab:blue")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"monovl train: {Path(run_dir).resolve().name}")
    fig.tight_layout()
    out_path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path

