import csv
import json
from pathlib import Path

import pytest

from shed import curves

LIVE = "curves/finetune/plots/metrics"


def rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _log(dest: str, losses: list[float]) -> None:
    with curves.live_steps(dest) as live:
        curve = curves.StepCurve(live)
        for step, loss in enumerate(losses):
            curve.before_step(step, [], 0.1)
            curve.after_step(step, loss, 0.1 * (step + 1))


def test_each_series_is_a_tsv_of_steps_and_a_rerun_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _log(LIVE, [2.0, 1.5, 1.25])
    assert [(r["step"], r["loss"]) for r in rows(f"{LIVE}/loss.tsv")] == [("0", "2.0"), ("1", "1.5"), ("2", "1.25")]
    assert [float(r["lr"]) for r in rows(f"{LIVE}/lr.tsv")] == pytest.approx([0.1, 0.2, 0.3])
    first = {p.name: p.read_bytes() for p in Path(LIVE).iterdir()}
    _log(LIVE, [2.0, 1.5, 1.25])
    assert {p.name: p.read_bytes() for p in Path(LIVE).iterdir()} == first
    # Nothing beside the series: no dvclive summary, dvc.yaml or report, no default dvclive/ folder.
    assert sorted(str(p) for p in Path("curves").rglob("*")) == [
        "curves/finetune", "curves/finetune/plots", LIVE, f"{LIVE}/loss.tsv", f"{LIVE}/lr.tsv"]
    assert not Path("dvclive").exists() and not Path("dvc.yaml").exists()


def test_each_step_is_on_disk_as_soon_as_it_is_logged_and_a_new_run_starts_afresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _log(LIVE, [9.0] * 5)  # an earlier, longer run
    with curves.live_steps(LIVE) as live:
        curve = curves.StepCurve(live)
        for step, loss in enumerate([2.0, 1.0, 0.5]):
            curve.after_step(step, loss, 0.1)
            assert [float(r["loss"]) for r in rows(f"{LIVE}/loss.tsv")] == [2.0, 1.0, 0.5][: step + 1]


def test_live_steps_wants_dvclives_layout():
    with pytest.raises(ValueError, match="plots/metrics"), curves.live_steps("curves/finetune"):
        pass


def test_series_logged_at_the_end_sit_in_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with curves.live_curves("out") as live:
        for run in (0, 1):
            for step in range(2):
                live.step = step
                live.log_metric(f"run-{run}/loss", 1.0 + run)
    assert sorted(str(p.relative_to("out")) for p in Path("out").rglob("*.tsv")) == ["run-0/loss.tsv", "run-1/loss.tsv"]
    assert [r["step"] for r in rows("out/run-1/loss.tsv")] == ["0", "1"]


def test_a_crash_mid_curve_leaves_the_previous_end_of_stage_curve_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with curves.live_curves("out") as live:
        live.log_metric("value", 1.0)
    before = Path("out/value.tsv").read_bytes()
    with pytest.raises(RuntimeError), curves.live_curves("out") as live:
        live.log_metric("value", 9.0)
        raise RuntimeError("killed")
    assert Path("out/value.tsv").read_bytes() == before


def test_the_finetune_stage_logs_one_row_per_optimizer_step_as_it_trains(tmp_path, monkeypatch, one_thread):
    from helpers import tiny_random_lm

    from shed import artifacts
    from shed.config import Params
    from shed.data import record_id
    from shed.stages import finetune

    model, tokenizer = tiny_random_lm()
    model.save_pretrained(tmp_path / "models/base")
    tokenizer.save_pretrained(tmp_path / "models/base")
    pool = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("red", "green", "blue", "cyan", "pink", "gold")]
    pool = [{"id": record_id(r["instruction"], r["input"], r["output"]), **r} for r in pool]
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/curated").mkdir(parents=True)
    (tmp_path / artifacts.POOL).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in pool))
    (tmp_path / artifacts.CURATED_RECORDS).write_text("".join(json.dumps({"id": r["id"]}) + "\n" for r in pool[:5]))
    monkeypatch.chdir(tmp_path)
    seen = []  # rows on disk when each step's callback returns
    after_step = curves.StepCurve.after_step

    def spy(self, step, loss, lr):
        after_step(self, step, loss, lr)
        seen.append(len(rows(artifacts.FINETUNE_CURVE + "/loss.tsv")))

    monkeypatch.setattr(curves.StepCurve, "after_step", spy)
    params = Params()
    params.finetune.device, params.train.epochs, params.train.batch_size = "cpu", 2, 2
    finetune.main(params)
    steps = json.loads(Path(artifacts.metrics("finetune")).read_text())["steps"]
    assert steps == 3 * 2  # ceil(5 / 2) x 2 epochs
    assert seen == list(range(1, steps + 1))
    loss = rows(artifacts.FINETUNE_CURVE + "/loss.tsv")
    assert [int(r["step"]) for r in loss] == list(range(steps)) and all(float(r["loss"]) > 0 for r in loss)
    assert len(rows(artifacts.FINETUNE_CURVE + "/lr.tsv")) == steps
    assert not Path("dvclive/finetune/metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forward", "inrun"])
def test_the_shapley_stage_logs_each_runs_loss_per_optimizer_step_as_it_trains(ws, monkeypatch, one_thread, method):
    """Each run's fit writes `run-<r>/loss.tsv` a row per optimizer step as the step happens; a rerun that keeps
    every run writes the same rows at once from what it kept."""
    from helpers import write_stage_params

    from shed import artifacts
    from shed.config import load_params
    from shed.stages import shapley

    write_stage_params(ws, epochs=2, method=method, k=2)
    monkeypatch.chdir(ws)
    live_dir = Path(artifacts.SHAPLEY_CURVES)
    seen: dict[str, list[tuple[int, int]]] = {}  # run -> (step, rows on disk when that step's callback returns)
    after_step = curves.StepCurve.after_step

    def spy(self, step, loss, lr):
        after_step(self, step, loss, lr)
        seen.setdefault(self.prefix, []).append((step, len(rows(live_dir / f"{self.prefix}loss.tsv"))))

    monkeypatch.setattr(curves.StepCurve, "after_step", spy)
    shapley.main(load_params())
    assert sorted(seen) == ["run-0/", "run-1/"]
    written = {}
    for prefix, steps in seen.items():
        assert len(steps) > 1 and steps == [(step, step + 1) for step in range(len(steps))]
        loss = rows(live_dir / f"{prefix}loss.tsv")
        assert [int(r["step"]) for r in loss] == list(range(len(steps))) and all(float(r["loss"]) > 0 for r in loss)
        assert not (live_dir / f"{prefix}lr.tsv").exists()
        written[prefix] = (live_dir / f"{prefix}loss.tsv").read_bytes()
    if method == "forward":  # the dev loss before and after each fit stays beside it
        assert [r["step"] for r in rows(live_dir / "run-1/dev_loss.tsv")] == ["0", "1"]
    assert not (live_dir.parent.parent / "metrics.json").exists()

    seen.clear()
    shapley.main(load_params())  # every run kept: nothing trains, the curves are rewritten whole
    assert seen == {}
    assert {p: (live_dir / f"{p}loss.tsv").read_bytes() for p in written} == written
