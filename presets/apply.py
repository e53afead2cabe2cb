"""Run a preset as a DVC experiment: its keys become `dvc exp run -S key=value` overrides.

    python presets/apply.py presets/paper.yaml                       # checks, prints and runs the experiment
    python presets/apply.py presets/gpu24gb.yaml -S prepare.pool=... --queue -n qwen   # more -S / dvc options
    python presets/apply.py presets/paper.yaml --print               # only print the command

A preset is a fragment of params.yaml (any blocks, any keys). It is checked against the schema first
(laid over params.yaml, with the extra -S values, by shed.config), so a typo fails here in one line
rather than in a stage hours later. params.yaml itself is never edited: the experiment carries the
values, and `dvc exp apply` / `dvc exp show` work as for any other.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def overrides(preset: dict, prefix: str = "") -> list[str]:
    """`key.sub=value` for each leaf of a nested mapping, values in YAML flow style (lists as [a,b])."""
    out = []
    for key, value in preset.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += overrides(value, f"{name}.")
        elif isinstance(value, list):
            out.append(f"{name}=[{','.join(map(str, value))}]")
        else:
            out.append(f"{name}={json.dumps(value) if isinstance(value, bool) else value}")
    return out


def check(preset: dict, extra: list[str], params_file: str = "params.yaml") -> None:
    """Lay the preset and the extra `-S k=v` values over params.yaml and validate with the schema."""
    from shed.config import load_params, merge_overrides
    from shed.fileio import ShedError

    params = merge_overrides(yaml.safe_load(Path(params_file).read_text(encoding="utf-8")), preset)
    for item in extra:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params), encoding="utf-8")
        try:
            load_params(path)
        except ShedError as exc:
            raise ShedError(str(exc).removeprefix(f"{path}: ")) from None


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    preset_path, rest = argv[0], argv[1:]
    dry = "--print" in rest
    rest = [a for a in rest if a != "--print"]
    extra = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a in {"-S", "--set-param"}]
    preset = yaml.safe_load(Path(preset_path).read_text(encoding="utf-8")) or {}
    try:
        check(preset, extra)
    except Exception as exc:  # ShedError: one line naming the key
        print(f"{preset_path}: {exc}", file=sys.stderr)
        return 1
    command = ["dvc", "exp", "run", *[arg for o in overrides(preset) for arg in ("-S", o)], *rest]
    print(shlex.join(command))
    return 0 if dry else subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
