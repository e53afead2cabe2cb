"""Peak memory of the in-run valuation against the dev set's size and its records' length: estimated beside measured.

    python benchmarks/memory.py                                   # the tiny model: 16-128 dev records x 100, 1,000 tokens
    python benchmarks/memory.py --model /work/main/models/smollm2 --dev 16 --response 100,1000
    python benchmarks/memory.py --dev 16 --response 1000 --dev-chunk 8 --chunk-tokens 0   # a chunk by count alone

Each run is the shapley stage's in-run valuation (shed.inrun_runner.InRunRunner, which the stage runs) in its own
process on the CPU: `--players` long instruction records (train.max_length 128 cuts them), one run of one epoch
(with the default 16 players, one step: the step that takes the dev gradients, which a longer run repeats every
shapley.dev_every steps without holding more), valued against `--dev` dev records whose responses are `--response`
tokens long (a dev record is scored on its whole response, up to shapley.dev_max_length). The settings are the
issue's: shapley.dev_every 4 (the dev gradients held), dev_chunk 8, train.batch_size 16.

Measured: the child's peak resident set (VmHWM of /proc/self/status, its own address space; `rss_gb`) and, from
the parent, the child's ru_maxrss by wait4 (`maxrss_gb`; it also counts the few MB of this driver at the fork);
`before_gb`, the child's resident set before the model loads (Python, torch, transformers, peft). Estimated:
`shed.memory.inrun_estimate` (what the stage logs and checks), its total (`estimate_gb`, which holds
memory.RUNTIME for the libraries) and its parts; --estimate-only runs no valuation. One JSON line per run; the
last line, the runs together. `--from-json docs/results/memory.jsonl --block docs/engine.md` writes the table of
saved runs into docs/engine.md's memory block.

The tiny model is the embedded default's architecture (base.* defaults) with 2,048 positions, untrained and
built once into benchmarks/.cache/memory/ (--cache; its weights' values change no memory). Records are the embedded
generator's, each output repeated to length. The driver imports no torch, so the children's ru_maxrss stays theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import tables  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = ROOT / "benchmarks/.cache/memory"  # the tiny model (tiny-2048/) and the last child's log; --cache
GB = 10**9


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def build_tiny(path: str) -> None:
    """The tiny model and its tokenizer into `path`."""
    from shed import tiny
    from shed.config import BaseConfig

    cfg = BaseConfig(max_length=2048)
    tokenizer = tiny.train_tokenizer(tiny.tokenizer_corpus(cfg.seed), cfg.vocab_size)
    model = tiny.build_model(cfg, tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def long_records(tokenizer, count: int, tokens: int, salt: int) -> list[dict]:
    """`count` embedded-generator records, each output repeated and cut to `tokens` tokens (ids: content hashes)."""
    from shed.data import record_id
    from shed.synthetic import generate_pool

    pool, _ = generate_pool(count, 0.0, salt)
    out = []
    for r in pool[:count]:
        text = r["output"]
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
            text = f"{text} {r['output']}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        record = {"instruction": r["instruction"], "input": r["input"], "output": tokenizer.decode(ids).strip()}
        out.append({"id": record_id(record), **record})
    return out


def child(spec: dict) -> dict:
    """One measured run (in this process): the in-run valuation of `spec`, its estimate and its peak."""
    import dataclasses

    import torch

    from shed import inrun, memory
    from shed.config import Params, validate
    from shed.inrun_runner import InRunRunner
    from shed.models import load_tokenizer

    torch.set_num_threads(spec["threads"])
    params = Params()
    params.train = dataclasses.replace(params.train, max_length=128, batch_size=16, epochs=1, template="qa",
                                       micro_batch_size=spec["micro_batch"])
    params.shapley = dataclasses.replace(params.shapley, method="inrun", model=spec["model"], k=1,
                                         dev_every=spec["dev_every"], dev_chunk=spec["dev_chunk"],
                                         chunk_tokens=spec["chunk_tokens"], dev_max_length=spec["dev_max_length"],
                                         device="cpu")
    validate(params, "benchmark")
    tokenizer = load_tokenizer(spec["model"])
    records = long_records(tokenizer, spec["players"], 300, salt=1)
    dev = long_records(tokenizer, spec["dev"], spec["response"], salt=2)
    shape = memory.read_shape(spec["model"])
    cap = params.shapley.dev_max_length or shape.max_positions
    lengths = [len(ids) for ids, _ in inrun.dev_rows(tokenizer, dev, params.train.template)]
    cut = memory.Cut.of(lengths, cap)
    estimate = memory.inrun_estimate(params, shape, "cpu", cut.lengths, params.train.max_length)
    out = {"estimate_gb": round(estimate.total / GB, 3),
           "estimate_parts_gb": {p.what: round(p.bytes / GB, 3) for p in estimate.parts},
           "dev_tokens_max": cut.tokens_max, "dev_truncated": cut.cut}
    if spec["estimate_only"]:
        return out
    before = _status("VmRSS:")
    start = time.perf_counter()
    runner = InRunRunner(params.shapley, params.train, dev, cap, records, list(range(len(records))))
    list(runner.run([0]))
    return {**out, "before_gb": round(before / GB, 3), "rss_gb": round(_status("VmHWM:") / GB, 3),
            "seconds": round(time.perf_counter() - start, 1)}


def run(spec: dict, cache: Path) -> dict:
    """`child(spec)` in its own process, reaped by wait4: its JSON line and its ru_maxrss."""
    log = cache / "child.log"
    with open(log, "w") as err, subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                                                 stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"run {spec} failed: {' | '.join(log.read_text().strip().splitlines()[-3:])}")
    result = json.loads(out.strip().splitlines()[-1])
    if not spec["estimate_only"]:
        result["maxrss_gb"] = round(usage.ru_maxrss * 1024 / GB, 3)
        result["measured_over_estimate"] = round(result["rss_gb"] / result["estimate_gb"], 3)
    return result


def markdown(rows: list[dict]) -> str:
    """The table of docs/engine.md#memory from the runs' JSON lines, in their order."""
    lines = ["| model | dev records | response tokens | longest dev item | dev_chunk / chunk_tokens / micro-batch "
             "| estimate | measured peak | measured / estimate | its largest part but the runtime | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        part, size = max(((k, v) for k, v in r["estimate_parts_gb"].items() if k != "runtime"), key=lambda kv: kv[1])
        peak, ratio, seconds = ((f"{r['rss_gb']:.2f} GB", f"{r['measured_over_estimate']:.2f}", f"{r['seconds']:,.0f}")
                                if "rss_gb" in r else ("estimated only", "", ""))
        chunk = f"{r['chunk_tokens']:,}" if r["chunk_tokens"] else "none"
        lines.append(f"| {r['model']} | {r['dev']} | {r['response']:,} | {r['dev_tokens_max']:,} | {r['dev_chunk']} / "
                     f"{chunk} / {r['micro_batch'] or 16} | {r['estimate_gb']:.2f} GB | {peak} | "
                     f"{ratio} | {part} {size:.2f} GB | {seconds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built here) or a local model directory")
    parser.add_argument("--dev", default="16,32,64,128", help="dev-set sizes (records)")
    parser.add_argument("--response", default="100,1000", help="dev responses' lengths (tokens)")
    parser.add_argument("--players", type=int, default=16, help="records valued (train.batch_size 16: one step)")
    parser.add_argument("--dev-every", type=int, default=4)
    parser.add_argument("--dev-chunk", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=8192, help="shapley.chunk_tokens")
    parser.add_argument("--micro-batch", type=int, default=0, help="train.micro_batch_size (0: the batch, 16)")
    parser.add_argument("--dev-max-length", type=int, default=0, help="shapley.dev_max_length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimate-only", action="store_true", help="the estimates alone: no valuation is run")
    parser.add_argument("--cache", default=str(CACHE), help="where the tiny model is built (once) and the log kept")
    parser.add_argument("--from-json", metavar="FILE", help="print the Markdown table of these saved runs' JSON lines "
                        "(to --block's file instead); run nothing")
    parser.add_argument("--block", metavar="PATH", help="with --from-json: write the table into PATH's memory block")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_json:
        table = markdown([r for r in tables.read_json_lines(args.from_json) if "runs" not in r])
        if args.block:
            tables.write_block(args.block, "memory", table)
        else:
            sys.stdout.write(table)
        return
    if args.child:
        spec = json.loads(args.child)
        if spec.get("build_tiny"):
            build_tiny(spec["build_tiny"])
        else:
            print(json.dumps(child(spec)))
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tiny = cache / "tiny-2048"
    model = str(tiny) if args.model == "tiny" else str(Path(args.model).resolve())
    if args.model == "tiny" and not (tiny / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--child", json.dumps({"build_tiny": str(tiny)})], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    for response in map(int, args.response.split(",")):
        for n_dev in map(int, args.dev.split(",")):
            spec = {"model": model, "dev": n_dev, "response": response, "players": args.players,
                    "dev_every": args.dev_every, "dev_chunk": args.dev_chunk, "chunk_tokens": args.chunk_tokens,
                    "dev_max_length": args.dev_max_length, "micro_batch": args.micro_batch, "threads": args.threads,
                    "estimate_only": args.estimate_only}
            row = {"model": Path(args.model).name, **{k: v for k, v in spec.items() if k not in ("model", "threads")},
                   **run(spec, cache)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(json.dumps({"benchmark": "memory", "model": args.model, "runs": rows}))


if __name__ == "__main__":
    main()
