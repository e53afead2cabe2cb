"""`shed report`: dvc.api.exp_show() rows (a recorded real run) into the table and the plot."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import DVC, restore_head, sh, wait_for_queue

from shed import report

# dvc.api.exp_show() of a tiny grid: the qocs baseline, then qwcs and random experiments (random at
# 0.2 with seeds 0 and 1); evaluate.include_base false. The workspace row repeats the last experiment.
FIXTURE = Path(__file__).parent / "fixtures" / "exp_rows.json"


def test_recorded_grid_gives_one_row_per_model_method_and_size():
    rows = json.loads(FIXTURE.read_text())
    summary = report.table(report.runs(rows))
    keys = [(s["model"], s["method"], s["fraction"]) for s in summary]
    assert keys == [("models/base", "qocs", 0.1), ("models/base", "qwcs", 0.1), ("models/base", "random", 0.1),
                    ("models/base", "random", 0.2)]
    # Every row against the recorded experiments, read straight from the rows (the workspace repeats one).
    recorded = defaultdict(list)
    for row in rows[1:]:
        recorded[(row["sample.method"], row["sample.subset_size"])].append(
            (int(row["size"]), row["finetuned.shed_embedded.acc"]))
    for s in summary:
        runs = recorded[(s["method"], s["fraction"])]
        accs = [acc for _, acc in runs]
        assert s["records"] == runs[0][0] == round(s["fraction"] * 200) and s["runs"] == len(runs)
        assert s["acc"]["shed_embedded"] == pytest.approx((np.mean(accs), np.std(accs)))
        assert s["base"] == {}  # include_base: false
    assert next(s for s in summary if s["fraction"] == 0.2)["runs"] == 2  # seeds 0 and 1 averaged


def test_identical_params_count_once_and_seeds_average():
    def exp(rev, seed, acc):
        return {"rev": rev, "Experiment": None, "typ": "branch_commit", "State": None, "sample.method": "random",
                "sample.subset_size": 0.1, "sample.seed": seed, "finetune.model": "m", "shapley.model": "m",
                "base.seed": 0, "finetuned.t.acc": acc, "finetuned.t.acc_norm": 0.9, "base.t.acc": 0.2,
                "fraction": 0.1, "size": 12.0}

    rows = [{"rev": "workspace", "typ": "baseline"}, exp("main", 0, 0.4), exp("a1", 0, 0.4), exp("b2", 1, 0.6),
            {**exp("c3", 2, 0.9), "State": "Queued", "finetuned.t.acc": None}]
    runs = report.runs(rows)
    assert len(runs) == 2  # the baseline and its identical experiment count once; the queued one not at all
    assert runs[0]["acc"] == {"t": 0.4} and runs[0]["base"] == {"t": 0.2}  # base.seed is a param, not a metric
    (row,) = report.table(runs)
    assert row["runs"] == 2 and row["acc"]["t"] == pytest.approx((0.5, 0.1)) and row["records"] == 12
    md = report.markdown([row])
    assert "| m | m | random | 0.1 | 12 | 2 | 0.5000 ± 0.1000 |" in md and "m t 0.2000" in md
    lines, refs = report.curves([row], "t")
    assert lines == {"random": [(0.1, 0.5, pytest.approx(0.1))]} and refs == {"base": 0.2}


def test_metrics_prefixed_with_their_file_are_read_too():
    row = {"rev": "x", "sample.method": "qocs", "sample.subset_size": 0.1, "metrics/eval.json:finetuned.t.acc": 0.7,
           "metrics/sample.json:size": 5.0, "metrics/sample.json:fraction": 0.1, "size": 99.0}
    (run,) = report.runs([row])
    assert run["acc"] == {"t": 0.7} and run["records"] == 5 and run["fraction"] == 0.1


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
    assert "| models/base | models/base | qocs | 0.1 | 20 | 1 | 0.2750 |" in md  # 11 of 40
    assert md.count("\n| models/base | models/base |") == 4
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
    rows = json.loads(FIXTURE.read_text())
    assert "workspace" not in [r["name"] for r in report.runs(rows)]
    assert [r["name"] for r in report.runs(rows[:1])] == ["workspace"]
