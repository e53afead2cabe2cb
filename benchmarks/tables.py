"""What the benchmarks share: their saved JSON lines and the Markdown tables written from them, and
running pipeline stages in-process.

Each benchmark prints one JSON line; `--markdown PATH` writes its tables from that dict, and
`--from-json FILE` renders them from a saved line without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", metavar="PATH", help="also write the result tables as Markdown")
    parser.add_argument("--from-json", metavar="FILE",
                        help="render the Markdown from this saved JSON line (to --markdown, else stdout); run nothing")


def read_json_line(path: str) -> dict:
    """The last line of `path` that is a JSON object: a saved JSON line, or a whole saved log."""
    for line in reversed(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{path}: no JSON line found")


def read_json_lines(path: str) -> list[dict]:
    """Every line of `path` that is a JSON object, in order (several saved runs of one benchmark)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip().startswith("{")]
    if not rows:
        raise SystemExit(f"{path}: no JSON line found")
    return rows


def header(script: str, source: str | None) -> tuple[list[str], str]:
    """(the do-not-edit comment naming the command that regenerates the file, the source's name)."""
    origin = f"`{source}`" if source else "the run that wrote this file (FILE: its JSON line)"
    return [f"<!-- Written by benchmarks/{script}; do not edit by hand. Regenerate with:",
            f"     python benchmarks/{script} --from-json {source or 'FILE'} --markdown <this file> -->", ""], origin


def write_markdown(text: str, path: str | Path | None) -> None:
    """To `path` (parents made), else to stdout."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def write_block(path: str | Path, name: str, text: str) -> None:
    """Replace what lies between `<!-- name:begin -->` and `<!-- name:end -->` in `path` with `text`."""
    path = Path(path)
    doc = path.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise SystemExit(f"{path}: needs one '{begin}' line before one '{end}' line")
    head, rest = doc.split(begin, 1)
    path.write_text(head + begin + "\n" + text + end + rest.split(end, 1)[1], encoding="utf-8")
    print(f"wrote {path} ({name} block)", file=sys.stderr)


def render_saved(args: argparse.Namespace, markdown: Callable[[dict, str | None], str]) -> bool:
    """With --from-json: write the tables of the saved line and return True (the caller stops there)."""
    if not args.from_json:
        return False
    write_markdown(markdown(read_json_line(args.from_json), args.from_json), args.markdown)
    return True


def quiet_offline_env() -> None:
    """Defaults for in-process pipeline runs on a small shared CPU; call before numpy and torch load."""
    for var, value in (("TQDM_DISABLE", "1"), ("OMP_NUM_THREADS", "1"),  # extra threads only contend
                       ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)


def set_dotted(raw: dict, key: str, value) -> None:
    """raw["a"]["b"] = value for key "a.b" (params.yaml blocks made as needed)."""
    *parents, last = key.split(".")
    for p in parents:
        raw = raw.setdefault(p, {})
    raw[last] = value


def run_stage(name: str, raw: dict) -> float:
    """One stage in-process with params `raw` (written to the current directory's params.yaml); seconds."""
    import importlib

    import yaml

    from shed.config import load_params

    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    start = time.perf_counter()
    importlib.import_module(f"shed.stages.{name}").main(load_params("params.yaml"))
    return time.perf_counter() - start


# The valuations the benchmarks run by name (--valuations): each one's shapley settings; forward and
# inrun-records value every record (docs/engine.md).
VALUATIONS = {
    "inrun": {"shapley.method": "inrun", "shapley.players": "proxies"},
    "retrain": {"shapley.method": "retrain", "shapley.players": "proxies"},
    "forward": {"shapley.method": "forward", "shapley.players": "records"},
    "inrun-records": {"shapley.method": "inrun", "shapley.players": "records", "shapley.normalize": "cosine"},
    "inrun-warmup": {"shapley.method": "inrun", "shapley.players": "records", "shapley.normalize": "cosine",
                     "shapley.warmup": 0.1},
}


def with_valuation(raw: dict, valuation: str) -> dict:
    """A copy of the params `raw` with `VALUATIONS[valuation]` set: each valuation of a run starts from the same
    params, whatever valuation ran before it in the workspace."""
    out = json.loads(json.dumps(raw))
    for name, value in VALUATIONS[valuation].items():
        set_dotted(out, name, value)
    return out


# A benchmark's "+blend" names: sample.within blend with these sample.blend signals.
# blendlr (a reference): blend3 without the valuation.
BLENDS = {"blend": ["value", "loss"], "blend3": ["value", "loss", "relevance"], "blendlr": ["loss", "relevance"]}
# "qfcs60": QFCS with sample.exclude 0.6, whatever the params say.
QFCS_SHARE = re.compile(r"qfcs(\d\d)")


# "@members": sample.cluster_score members (clusters ranked by their members' within signal, not their value).
MEMBERS = "@members"


def plain_method(method: str) -> str:
    """The method name without QFCS's share digits (qfcs60+blend3 -> qfcs+blend3)."""
    share = QFCS_SHARE.match(method)
    return "qfcs" + method[share.end():] if share else method


def with_method(raw: dict, method: str) -> dict:
    """A copy of the params `raw` set for a benchmark's method name: sample.method, "+W" for sample.within W (e.g.
    qocs+loss; +blend3: within blend over value, loss and relevance, `BLENDS`), and QFCS's share left out as two
    digits after the name where it is not the params' (qfcs60+blend3: sample.exclude 0.6); "@members" ranks the
    clusters by the within signal (sample.cluster_score members; qocs+blend3@members)."""
    out = json.loads(json.dumps(raw))
    share = QFCS_SHARE.match(method)
    if share:
        set_dotted(out, "sample.exclude", int(share.group(1)) / 100)
    plain = plain_method(method)
    if plain.endswith(MEMBERS):
        set_dotted(out, "sample.cluster_score", "members")
        plain = plain[:-len(MEMBERS)]
    name, _, within = plain.partition("+")
    set_dotted(out, "sample.method", name)
    set_dotted(out, "sample.within", "blend" if within in BLENDS else within or "nearest")
    if within in BLENDS:
        set_dotted(out, "sample.blend", BLENDS[within])
    return out


def scored(method: str) -> bool:
    """Does the method read the valuation (so runs again for each valuation and dev set)?"""
    return method.startswith(("qocs", "qwcs", "qfcs")) and ("@" not in method or method.endswith(MEMBERS))

