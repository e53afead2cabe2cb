"""The project's structure keeps results from going stale: dvc.yaml says exactly what each stage runs and reads."""

import ast
import re
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT
from shed import artifacts, codedeps

DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _names(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


@pytest.mark.parametrize("stage", codedeps.STAGES)
def test_code_deps_are_exactly_the_modules_the_stage_imports(stage):
    listed = sorted(d for d in _names(DVC_STAGES[stage]["deps"]) if d.startswith("src/"))
    derived = codedeps.stage_deps(stage)
    assert listed == derived, (f"dvc.yaml stage {stage}: code deps differ from the imports; "
                               f"add {sorted(set(derived) - set(listed))}, drop {sorted(set(listed) - set(derived))}")


@pytest.mark.parametrize("stage", codedeps.STAGES)
def test_data_deps_outs_params_and_metrics_match_the_artifacts_module(stage):
    spec = DVC_STAGES[stage]
    assert spec["cmd"] == f"shed {stage}"
    assert [d for d in _names(spec["deps"]) if not d.startswith("src/")] == artifacts.INPUTS[stage]
    assert _names(spec.get("outs")) + [p for p in _names(spec.get("plots")) if p != artifacts.SCORES_PLOT] \
        == [p for p in artifacts.OUTPUTS[stage] if p != artifacts.SCORES_PLOT]
    if artifacts.SCORES_PLOT in artifacts.OUTPUTS[stage]:
        assert artifacts.SCORES_PLOT in _names(spec.get("plots"))
    assert _names(spec["metrics"]) == [artifacts.metrics(stage)]
    assert spec["params"] == artifacts.PARAMS[stage]


def test_the_deps_check_sees_an_import_added_inside_a_function(tmp_path, monkeypatch):
    package = tmp_path / "shed"
    (package / "stages").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stages" / "__init__.py").write_text("")
    (package / "helper.py").write_text("X = 1\n")
    (package / "other.py").write_text("Y = 2\n")
    stage = package / "stages" / "demo.py"
    stage.write_text("from shed import helper\n")
    monkeypatch.setattr(codedeps, "PACKAGE_DIR", package)
    codedeps.direct_imports.cache_clear()
    try:
        assert codedeps.stage_deps("demo") == ["src/shed/helper.py", "src/shed/stages/demo.py"]
        before = codedeps.fingerprint(["shed.stages.demo"])
        stage.write_text("from shed import helper\n\ndef f():\n    import shed.other\n")
        codedeps.direct_imports.cache_clear()
        assert codedeps.stage_deps("demo") == ["src/shed/helper.py", "src/shed/other.py", "src/shed/stages/demo.py"]
        after = codedeps.fingerprint(["shed.stages.demo"])
        (package / "other.py").write_text("Y = 3\n")
        assert codedeps.fingerprint(["shed.stages.demo"]) != after != before
        assert codedeps.fingerprint(["shed.stages.demo"], exclude=frozenset({"shed.other"})) != before  # demo.py changed
    finally:
        codedeps.direct_imports.cache_clear()


@pytest.mark.parametrize("stage", codedeps.STAGES)
def test_stages_never_import_each_other(stage):
    others = {m for m in codedeps.direct_imports(f"shed.stages.{stage}") if m.startswith("shed.stages.")}
    assert not others, f"shed.stages.{stage} imports {sorted(others)}: move what it needs into a shared module"


def test_package_inits_hold_no_code():
    """codedeps leaves __init__ files out of the deps: they must stay docstring (and version) only."""
    for init in sorted(codedeps.PACKAGE_DIR.rglob("__init__.py")):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) or (isinstance(n, ast.Assign) and n.targets[0].id == "__version__")
                   for n in body), f"{init} holds code"


def test_stages_without_a_model_import_no_torch():
    code = ("import sys\nimport shed.cli, shed.stages.prepare, shed.stages.cluster, shed.stages.sample\n"
            "shed.cli.build_parser(['sample', '--help'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("edited, reruns", [("training.py", True), ("prompts.py", True), ("scoring.py", True),
                                            ("tasks/shed_mc.yaml", True), ("sampling.py", False),
                                            ("config.py", False), ("stages/sample.py", False)])
def test_job_store_code_fingerprint_follows_the_code_that_trains_and_scores(tmp_path, monkeypatch, edited, reruns):
    import shutil

    from shed import jobstore

    package = tmp_path / "shed"
    shutil.copytree(codedeps.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedeps, "PACKAGE_DIR", package)
    codedeps.direct_imports.cache_clear()
    try:
        before = jobstore.code_fingerprint()
        with (package / edited).open("a") as fh:
            fh.write("\n# an edit\n")
        assert (jobstore.code_fingerprint() != before) == reruns
    finally:
        codedeps.direct_imports.cache_clear()


def test_the_distribution_name_is_shed_curate_and_no_doc_or_message_installs_the_formatter():
    """`shed` on PyPI is an unrelated code formatter: installs name shed-curate, or `.` in a checkout."""
    import re

    from shed.fileio import DISTRIBUTION, install_hint

    name = re.search(r'^name = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert name == DISTRIBUTION == "shed-curate"
    assert install_hint("fast") == "pip install -e '.[fast]' in a checkout, or pip install 'shed-curate[fast]'"
    files = [ROOT / "README.md", ROOT / "params.yaml", *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py")]
    wrong = [str(f.relative_to(ROOT)) for f in files if re.search(r"pip install ['\"]?shed\[", f.read_text())]
    assert not wrong, f"{wrong} tell users to install the formatter `shed`"


def test_the_readme_layout_names_every_module_and_benchmark():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):text.index("## Research notes")]
    words = set(re.findall(r"[a-z_]+", layout))
    modules = {p.stem for p in (ROOT / "src/shed").glob("*.py")} - {"__init__", "__main__"}
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert not (modules | scripts) - words, f"README.md's layout does not name {sorted((modules | scripts) - words)}"
