import csv
from pathlib import Path

import pytest

from shed import curves


def _log(dest: str, losses: list[float], prefix: str = "") -> None:
    with curves.live_curves(dest) as live:
        curve = curves.StepCurve(live, prefix)
        for step, loss in enumerate(losses):
            curve.before_step(step, [], 0.1)
            curve.after_step(step, loss, 0.1 * (step + 1))


def test_each_series_is_a_tsv_of_steps_and_a_rerun_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _log("curves/finetune", [2.0, 1.5, 1.25])
    rows = list(csv.DictReader(open("curves/finetune/loss.tsv"), delimiter="\t"))
    assert [(r["step"], r["loss"]) for r in rows] == [("0", "2.0"), ("1", "1.5"), ("2", "1.25")]
    lr = list(csv.DictReader(open("curves/finetune/lr.tsv"), delimiter="\t"))
    assert [float(r["lr"]) for r in lr] == pytest.approx([0.1, 0.2, 0.3])
    first = {p.name: p.read_bytes() for p in Path("curves/finetune").iterdir()}
    _log("curves/finetune", [2.0, 1.5, 1.25])
    assert {p.name: p.read_bytes() for p in Path("curves/finetune").iterdir()} == first
    assert not Path("dvclive").exists() and not Path("dvc.yaml").exists()  # nothing written beside dest


def test_prefixed_series_sit_in_their_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with curves.live_curves("out") as live:
        for run in (0, 1):
            curve = curves.StepCurve(live, f"run-{run}/")
            for step in range(2):
                curve.after_step(step, 1.0 + run, 0.1)
    assert sorted(str(p.relative_to("out")) for p in Path("out").rglob("*.tsv")) == [
        "run-0/loss.tsv", "run-0/lr.tsv", "run-1/loss.tsv", "run-1/lr.tsv"]


def test_a_crash_mid_curve_leaves_the_previous_curve_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _log("out", [1.0, 0.5])
    before = Path("out/loss.tsv").read_bytes()
    with pytest.raises(RuntimeError):
        with curves.live_curves("out") as live:
            curves.StepCurve(live).after_step(0, 9.0, 0.1)
            raise RuntimeError("killed")
    assert Path("out/loss.tsv").read_bytes() == before
