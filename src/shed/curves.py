"""Training curves with dvclive: per-step series a stage writes as DVC plots (`dvc plots show`/`diff`).

Two ways in. `live_steps` writes the series in place as the steps happen (one TSV row per `log_metric`,
`next_step()` after each optimizer step), so a long fine-tune's or in-run/forward valuation's loss curve can be
watched while it runs (`dvc plots show`, the VS Code extension); a crashed run leaves its series as far as they
got, and DVC records nothing of an unfinished stage. `live_curves` writes series known only at a stage's end
(the retraining valuation's) into a scratch directory and moves the finished curves into place, so a crash leaves the previous curves whole. Neither
writes timestamps, so a rerun writes the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shed.fileio import atomic_path


def _live(live_dir: str):
    """A dvclive `Live` over `live_dir` (its series go to `live_dir`/plots/metrics/<name>.tsv), no DVC ties."""
    from dvclive import Live

    class StepLive(Live):
        def post_data_to_studio(self):
            # dvclive builds Studio's payload at every step by rereading every series, Studio or not: quadratic
            # in the steps (55 s over 3,000 steps on 2 cores, against 16 s without). Only Studio reads it.
            if "data" not in getattr(self, "_studio_events_to_skip", ()):
                super().post_data_to_studio()

    with tempfile.TemporaryDirectory(prefix="shed-live-") as scratch:
        # Made from inside a scratch directory: dvclive then finds no DVC repository to tie the curves to (the
        # stage's outputs are DVC's business), and works in a repo with no commit yet.
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            return StepLive(dir=str(Path(cwd, live_dir)), save_dvc_exp=False, dvcyaml=None, report=None)
        finally:
            os.chdir(cwd)


@contextlib.contextmanager
def live_steps(dest: str) -> Iterator:
    """A dvclive `Live` whose metric series (`<name>.tsv`, one row per logged step) are written straight into
    `dest` (a `<dir>/plots/metrics` folder, dvclive's layout) as they are logged. dest's old series go when it
    starts; dvclive's summary `<dir>/metrics.json` goes at the end (the stage's own metrics file has the figures)."""
    dest_path = Path(dest)
    if dest_path.parts[-2:] != ("plots", "metrics"):
        raise ValueError(f"{dest}: live_steps writes dvclive's <dir>/plots/metrics layout")
    live = _live(str(dest_path.parent.parent))  # dvclive clears the old series itself
    try:
        with live:
            yield live
    finally:
        Path(live.metrics_file).unlink(missing_ok=True)


@contextlib.contextmanager
def live_curves(dest: str) -> Iterator:
    """A dvclive `Live` whose metric series (`<name>.tsv`, one row per `live.step`) end up in `dest` once the
    block finishes; a failing block leaves `dest` as it was."""
    with tempfile.TemporaryDirectory(prefix="shed-live-out-") as scratch:
        with _live(scratch) as live:
            yield live
        with atomic_path(dest) as tmp:
            metrics = Path(live.plots_dir) / "metrics"
            if metrics.is_dir():
                shutil.move(metrics, tmp)
            else:
                Path(tmp).mkdir()


class StepCurve:
    """A `LoraTrainer.fit` callback logging each optimizer step's training loss (`<prefix>loss`) and, with `lr`,
    its learning rate, as the step happens, at the fit's own step number (from 0). `resumed(losses)` logs at once
    the steps taken before (a fit resumed from a checkpoint, a run kept from an earlier stage run): loss only, their
    learning rates are not kept."""

    def __init__(self, live, prefix: str = "", lr: bool = True):
        self.live, self.prefix, self.lr = live, prefix, lr

    def _loss(self, step: int, loss: float) -> None:
        self.live.step = step
        self.live.log_metric(f"{self.prefix}loss", round(loss, 6))

    def resumed(self, losses: list[float]) -> None:
        for step, loss in enumerate(losses):
            self._loss(step, loss)

    def before_step(self, step: int, batches, lr: float) -> None:
        pass

    def after_step(self, step: int, loss: float, lr: float) -> None:
        self._loss(step, loss)
        if self.lr:
            self.live.log_metric(f"{self.prefix}lr", lr)
        self.live.next_step()
