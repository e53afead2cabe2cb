"""`shed report`: parsing `dvc exp show --json` (a recorded real run) into the table and the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DVC, restore_head, sh, wait_for_queue

from shed import report

# `dvc exp show --json` of the README's grid on the embedded default (params and metrics kept).
FIXTURE = Path(__file__).parent / "fixtures" / "exp_show.json"


def test_recorded_grid_gives_one_row_per_model_method_and_size():
    summary = report.table(report.runs(json.loads(FIXTURE.read_text())))
    keys = [(s["model"], s["method"], s["fraction"]) for s in summary]
    assert len(keys) == len(set(keys)) == 13 and summary[-1]["method"] == "full"  # 4 methods x 3 sizes + full
    assert {m for _, m, _ in keys} == {"qocs", "qwcs", "random", "dsir", "full"}
    qocs = next(s for s in summary if s["method"] == "qocs" and s["fraction"] == 0.1)
    assert qocs["records"] == 120 and qocs["acc"]["shed_embedded"][0] == pytest.approx(71 / 240)
    # Every row against the recorded experiments, read straight from the JSON: one run each, so the
    # mean is that run's accuracy (a whole number of the 240 questions) and the std is 0.
    recorded = {}
    for commit in json.loads(FIXTURE.read_text()):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                metrics = rev["data"]["metrics"]
                sample = metrics["metrics/sample.json"]["data"]
                evals = metrics["metrics/eval.json"]["data"]
                recorded[(sample["method"], sample["fraction"])] = (
                    sample["size"], evals["finetuned"]["shed_embedded"]["acc"], evals["base"]["shed_embedded"]["acc"])
    assert len(recorded) == 13 and set(recorded) == {(m, f) for _, m, f in keys}
    for s in summary:
        size, acc, base = recorded[(s["method"], s["fraction"])]
        assert s["records"] == size and s["runs"] == 1 and s["acc"] == {"shed_embedded": (acc, 0.0)}
        assert s["base"] == {"shed_embedded": base} and acc * 240 == pytest.approx(round(acc * 240))


def test_identical_params_count_once_and_seeds_average():
    def exp(seed, acc):
        return {"rev": f"r{seed}{acc}", "name": None, "data": {
            "params": {"params.yaml": {"data": {"sample": {"method": "random", "subset_size": 0.1, "seed": seed},
                                                 "finetune": {"model": "m"}, "shapley": {"model": "m"}}}},
            "metrics": {"metrics/eval.json": {"data": {"finetuned": {"t": {"acc": acc}}, "base": {"t": {"acc": 0.2}}}},
                        "metrics/sample.json": {"data": {"fraction": 0.1, "size": 12}}}}}

    commit = {**exp(0, 0.4), "experiments": [{"revs": [exp(0, 0.4)]}, {"revs": [exp(1, 0.6)]}],
              }
    rows = report.runs([{"rev": "workspace", "data": {}}, commit])
    assert len(rows) == 2  # the baseline and its identical experiment count once
    (row,) = report.table(rows)
    assert row["runs"] == 2 and row["acc"]["t"] == pytest.approx((0.5, 0.1)) and row["records"] == 12
    md = report.markdown([row])
    assert "| m | m | random | 0.1 | 12 | 2 | 0.5000 ± 0.1000 |" in md and "m t 0.2000" in md
    lines, refs = report.curves([row], "t")
    assert lines == {"random": [(0.1, 0.5, pytest.approx(0.1))]} and refs == {"base": 0.2}


def test_two_fine_tuned_models_are_separate_groups_and_lines():
    rows = [{"name": n, "method": meth, "fraction": 0.1, "records": 5, "model": model, "valued_with": "small",
             "acc": {"t": acc}, "base": {}} for n, meth, model, acc in
            [("a", "qocs", "small", 0.3), ("b", "qocs", "large", 0.5), ("c", "full", "large", 0.45)]]
    summary = report.table(rows)
    assert [(s["model"], s["method"]) for s in summary] == [("large", "qocs"), ("large", "full"), ("small", "qocs")]
    lines, refs = report.curves(summary, "t")
    assert set(lines) == {"qocs @ large", "qocs @ small"} and refs == {"full pool @ large": 0.45}


def test_report_writes_markdown_and_png_and_rejects_an_empty_run(tmp_path):
    report.main(json_path=str(FIXTURE), out=str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Eval accuracy")
    assert "| models/base | models/base | qocs | 0.1 | 120 | 1 | 0.2958 |" in md  # 71/240
    assert md.count("\n| models/base | models/base |") == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy-shed_embedded.png", "report.md"]
    assert (tmp_path / "accuracy-shed_embedded.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.json").write_text("[]")
    result = subprocess.run([sys.executable, "-m", "shed", "report", "--json", str(tmp_path / "empty.json")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "no evaluated experiment" in result.stderr


@pytest.mark.slow
def test_queued_grid_runs_downstream_stages_and_reports(workspace, tmp_path):
    ws, _ = workspace
    restore_head(ws)
    # dsir at two sizes: the second must not be restored from the first's run-cache entry.
    for size in ["0.2", "0.1"]:
        sh(ws, DVC, "exp", "run", "--queue", "-S", "sample.method=dsir", "-S", f"sample.subset_size={size}")
    sh(ws, DVC, "queue", "start", "-j", "1")
    status = wait_for_queue(ws)
    # The two queued experiments, and nothing else, ran (and succeeded).
    assert "Failed" not in status and status.count("Success") == 2, status
    sh(ws, sys.executable, "-m", "shed", "report", "--out", str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| dsir | 0.2 | 40 |" in md and "| dsir | 0.1 | 20 |" in md


def test_the_workspace_counts_only_when_nothing_else_was_evaluated():
    data = json.loads(FIXTURE.read_text())
    evaluated = data[1]["experiments"][0]["revs"][0]["data"]  # a finished experiment's params and metrics
    workspace = {"rev": "workspace", "data": evaluated, "experiments": None}
    assert len(report.runs([workspace, *data[1:]])) == 13
    assert [r["name"] for r in report.runs([workspace])] == ["workspace"]
