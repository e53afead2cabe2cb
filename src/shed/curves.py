"""Training curves with dvclive: per-step series a stage writes as DVC plots (`dvc plots show`/`diff`).

dvclive writes into a scratch directory and only the finished curves move into place (no half curve
after a crash). No timestamps, so a rerun writes the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shed.fileio import atomic_path


@contextlib.contextmanager
def live_curves(dest: str) -> Iterator:
    """A dvclive `Live` whose metric series (`<name>.tsv`, one row per `live.step`) end up in `dest`."""
    from dvclive import Live

    with tempfile.TemporaryDirectory(prefix="shed-live-") as scratch:
        # Made from inside the scratch directory: dvclive then finds no DVC repository to tie the curves
        # to (the stage's outputs are DVC's business), and works in a repo with no commit yet.
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            live = Live(dir=scratch, save_dvc_exp=False, dvcyaml=None, report=None)
        finally:
            os.chdir(cwd)
        with live:
            yield live
        with atomic_path(dest) as tmp:
            metrics = Path(live.plots_dir) / "metrics"
            if metrics.is_dir():
                shutil.move(metrics, tmp)
            else:
                Path(tmp).mkdir()


class StepCurve:
    """A `LoraTrainer.fit` callback logging each step's training loss and learning rate (`prefix` names
    the series of one run among several, e.g. "run-1/")."""

    def __init__(self, live, prefix: str = ""):
        self.live, self.prefix = live, prefix

    def before_step(self, step: int, batches, lr: float) -> None:
        pass

    def after_step(self, step: int, loss: float, lr: float) -> None:
        self.live.step = step
        self.live.log_metric(f"{self.prefix}loss", round(loss, 6))
        self.live.log_metric(f"{self.prefix}lr", lr)
