"""The stage commands as users run them: one-line errors, non-zero exit, nothing half-written."""

import json
import subprocess
import sys


def run_shed(cwd, *args):
    return subprocess.run([sys.executable, "-m", "shed", *args], cwd=cwd, capture_output=True, text=True)


def test_malformed_pool_stops_prepare_with_one_line_and_no_output(tmp_path):
    (tmp_path / "pool.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c",\n', encoding="utf-8")
    (tmp_path / "params.yaml").write_text("prepare:\n  pool: pool.jsonl\n", encoding="utf-8")
    result = run_shed(tmp_path, "prepare")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["shed prepare: error: pool.jsonl: line 2: not valid JSON (Expecting property name enclosed "
                      "in double quotes)"]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.jsonl"))


def test_prepare_keeps_earlier_outputs_when_the_new_input_is_bad(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare:\n  embedded: {pool_size: 50, dev_size: 10, eval_size: 10}\n")
    assert run_shed(tmp_path, "prepare").returncode == 0
    before = (tmp_path / "data/prepared/pool.jsonl").read_bytes()
    (tmp_path / "bad.json").write_text('[{"instruction": "x", "output": null}]')
    (tmp_path / "params.yaml").write_text("prepare:\n  pool: bad.json\n")
    result = run_shed(tmp_path, "prepare")
    assert result.returncode == 1 and "bad.json: item 1: field 'output' is null" in result.stderr
    assert (tmp_path / "data/prepared/pool.jsonl").read_bytes() == before


def test_embedded_prepare_is_byte_identical_across_runs(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare:\n  embedded: {pool_size: 300, dev_size: 20, eval_size: 20}\n")
    run_shed(tmp_path, "prepare")
    first = (tmp_path / "data/prepared/pool.jsonl").read_bytes()
    run_shed(tmp_path, "prepare")
    assert (tmp_path / "data/prepared/pool.jsonl").read_bytes() == first
    counts = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert counts["pool"] == 300 and counts["planted_harmful"] > 0
