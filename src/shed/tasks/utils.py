"""Datasets for the offline task YAMLs here, read in place from the paths lm-eval passes as metadata.

Project: evaluate.mmlu_dir / evaluate.arc_file. lm-eval CLI:
    lm_eval --include_path src/shed/tasks --tasks mmlu_local --metadata '{"mmlu_dir": "../shared/data/mmlu"}'
"""

from __future__ import annotations

from pathlib import Path

import datasets

from shed.fileio import ShedError
from shed.mcdata import arc_rows, mmlu_rows


def _need(value, key: str, task: str) -> str:
    if not value:
        raise ShedError(f"{task}: no data path; set evaluate.{key} in params.yaml "
                        f"(lm-eval CLI: --metadata '{{\"{key}\": \"PATH\"}}')")
    return str(value)


def load_mmlu(mmlu_dir=None, **_) -> datasets.DatasetDict:
    root = _need(mmlu_dir, "mmlu_dir", "mmlu_local")
    splits = {"test": datasets.Dataset.from_list(mmlu_rows(root, "test"))}
    if (Path(root) / "dev").is_dir():
        splits["dev"] = datasets.Dataset.from_list(mmlu_rows(root, "dev"))
    return datasets.DatasetDict(splits)


def load_arc(arc_file=None, **_) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(arc_rows(_need(arc_file, "arc_file",
                                                                                  "arc_challenge_local")))})
