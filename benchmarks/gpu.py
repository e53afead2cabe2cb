"""GPU benchmark: Shapley jobs (fine-tune a fresh LoRA adapter, score the dev set) with the paper's
recipe on a small real model, 1, 2, 4 and 8 workers per GPU. The one command a GPU owner runs:

    shed fetch-model && python benchmarks/gpu.py      # SmolLM2-135M (models/smollm2), every GPU: ~10 min
    python benchmarks/gpu.py --model HuggingFaceTB/SmolLM2-135M --pool data.jsonl   # a hub id (online), a pool
    python benchmarks/gpu.py                          # no GPU: the same code at a tiny size (~2 min on 2 cores)
    python benchmarks/gpu.py --memory                 # the memory table of docs/gpu.md (CPU, ~1 min)

The recipe is presets/paper.yaml's train block (LoRA r=128/alpha=256/dropout 0.1 on every projection,
batch 128 of micro-batches 8, cutoff 1024, 3 epochs, lr 3e-4, 4% warmup, length-grouped micro-batches;
gradient checkpointing only with --gradient-checkpointing: a 135M model does not need it). Each job
trains on --records records drawn from the pool (default: the embedded generator, or --pool) and is
scored (loglik) on --dev questions. Workers are processes placed by shed.executors.worker_devices
(round robin over the GPUs), each loading the model once; the clock starts when all have loaded and
run one warm-up job, so the figures are steady-state throughput.

On a CPU (no CUDA, or --tiny) it runs end to end at a tiny size: a seeded random tiny Llama built
here, the paper-like recipe scaled down (batch 16 of micro-batches 4, r 16, cutoff 128, gradient
checkpointing on), 1 and 2 workers (the 2-vs-1 figure of docs/gpu.md).

The last line printed is one JSON object: per worker count, jobs per hour, training tokens per second
(tokens in the records, without padding), peak GPU memory, and whether every job's value equals its
value with one worker; `inrun_seconds_for_C_proxies`, the in-run method's time to value C proxies in
one run (shapley.method inrun, k = 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = ROOT / "benchmarks/.cache/gpu"
SMOLLM2 = ROOT / "models/smollm2"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALPACA = ROOT.parent / "shared/data/instruction_pools/alpaca_5000.json"  # these dev machines' copy, if present
# The tiny CPU mode: the paper's recipe with every size scaled down.
TINY_TRAIN = {"batch_size": 16, "micro_batch_size": 4, "max_length": 128, "gradient_checkpointing": True,
              "template": "qa", "lora": {"r": 16, "alpha": 32}}


def train_config(overrides: dict):
    """presets/paper.yaml's train block, then `overrides`, validated by the schema (shed.config)."""
    from shed.config import load_params, merge_overrides

    paper = yaml.safe_load((ROOT / "presets/paper.yaml").read_text(encoding="utf-8"))["train"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump({"train": merge_overrides(paper, overrides)}), encoding="utf-8")
        return load_params(path).train


def tiny_model() -> str:
    """A seeded random tiny Llama and its tokenizer, saved once under benchmarks/.cache (gitignored)."""
    from shed import tiny
    from shed.config import BaseConfig

    out = CACHE / "tiny-model"
    if not (out / "config.json").exists():
        cfg = BaseConfig(pretrain_steps=0)
        tokenizer = tiny.train_tokenizer(tiny.tokenizer_corpus(cfg.seed), cfg.vocab_size)
        tiny.build_model(cfg, tokenizer).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return str(out)


def pool(source: str | None, size: int) -> tuple[list[dict], str]:
    """(records, where from): a pool file (any format the prepare stage reads) or the embedded generator."""
    from shed.synthetic import generate_pool

    if source:
        from shed.data import load_rows, normalize_pool

        return normalize_pool(load_rows(source), source), source
    return generate_pool(size, 0.0, 0)[0], "embedded"


def make_jobs(records: list[dict], count: int, size: int, seed: int = 0) -> list[dict]:
    """`count` jobs of `size` records each, drawn without replacement per job (seeded), keyed as the stage keys them."""
    import numpy as np

    from shed.jobstore import subset_key

    rng = np.random.default_rng(seed)
    jobs = []
    for _ in range(count):
        rows = [records[i] for i in sorted(rng.choice(len(records), size=min(size, len(records)), replace=False))]
        jobs.append({"key": subset_key([r["id"] for r in rows]), "records": rows, "seed": 0})
    return jobs


def _worker(spec, device: str, threads: int, warmup: dict, jobs, results) -> None:
    """One worker process: load once, one warm-up job, then jobs until None; finally its peak memory."""
    import torch

    from shed.executors import JobRunner

    runner = JobRunner(spec, device, threads)
    runner.run(warmup)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    results.put({"ready": device})
    trainer = runner.trainer
    while (job := jobs.get()) is not None:
        result = runner.run(job)
        lengths = [len(trainer.encode(r)[0]) for r in job["records"]]
        steps = trainer.schedule(job["records"], job["seed"])
        result["tokens"] = trainer.cfg.epochs * sum(lengths)
        result["padded_tokens"] = sum(len(mb) * max(lengths[i] for i in mb) for step in steps for mb in step)
        results.put(result)
    peak = None
    if device.startswith("cuda"):
        peak = {"allocated": torch.cuda.max_memory_allocated(device),
                "reserved": torch.cuda.max_memory_reserved(device)}
    results.put({"done": device, "peak": peak})


def run_workers(spec, workers: int, jobs: list[dict], warmup: dict, threads: int = 0) -> dict:
    """`workers` processes on `worker_devices(spec.device, workers)`, each with `threads` CPU threads
    (default: the cores split between them, as the shapley stage does): steady-state figures for `jobs`."""
    from shed.executors import threads_per_worker, worker_devices

    devices = worker_devices(spec.device, workers)
    context = multiprocessing.get_context("spawn")
    job_queue, results = context.Queue(), context.Queue()
    threads = threads or threads_per_worker(workers)
    procs = [context.Process(target=_worker, args=(spec, d, threads, warmup, job_queue, results), daemon=True)
             for d in devices]
    for p in procs:
        p.start()
    for _ in procs:
        message = results.get(timeout=1800)
        assert "ready" in message, message
    start = time.perf_counter()
    for job in jobs:
        job_queue.put(job)
    for _ in procs:
        job_queue.put(None)
    done, peaks, seconds = [], [], 0.0  # job results and each worker's peak memory interleave across workers
    while len(done) < len(jobs) or len(peaks) < len(procs):
        message = results.get(timeout=3600)
        (peaks if "done" in message else done).append(message)
        if len(done) == len(jobs) and not seconds:
            seconds = time.perf_counter() - start
    for p in procs:
        p.join()
    per_gpu: dict[str, int] = {}
    for message in peaks:
        if message["peak"]:
            per_gpu[message["done"]] = per_gpu.get(message["done"], 0) + message["peak"]["reserved"]
    gib = 2**30
    worst = max((m["peak"]["allocated"] for m in peaks if m["peak"]), default=None)
    return {
        "jobs": len(done), "threads_per_worker": threads, "seconds": round(seconds, 2),
        "jobs_per_hour": round(3600 * len(done) / seconds, 1),
        "train_tokens_per_second": round(sum(r["tokens"] for r in done) / seconds, 1),
        "padding_share": round(1 - sum(r["tokens"] for r in done) / sum(r["padded_tokens"] for r in done), 3),
        "mean_train_seconds": round(sum(r["train_seconds"] for r in done) / len(done), 2),
        "mean_score_seconds": round(sum(r["score_seconds"] for r in done) / len(done), 2),
        "peak_gpu_memory_gib_per_worker": round(worst / gib, 2) if worst is not None else None,
        "peak_gpu_memory_gib_per_gpu": round(max(per_gpu.values()) / gib, 2) if per_gpu else None,
        "values": {r["key"]: r["value"] for r in done},
    }


def inrun_seconds(spec, records: list[dict], dev: list[dict]) -> float:
    """The in-run method's wall time to value `records` (the C proxies) in one training run (k = 1) with the
    same recipe, model and dev set: shed.inrun.value_runs, as the shapley stage calls it (model load excluded)."""
    from shed import inrun
    from shed.models import load_causal_lm
    from shed.training import LoraTrainer, pad_rows

    model, tokenizer = load_causal_lm(spec.model, spec.device, spec.dtype)
    trainer = LoraTrainer(model, tokenizer, spec.train)
    dev_batch = pad_rows(inrun.dev_rows(tokenizer, dev), tokenizer.pad_token_id, trainer.device)
    players = list(range(len(records)))
    start = time.perf_counter()
    inrun.value_runs(trainer, records, players, dev_batch, inrun.InRunCredits(players, len(dev), 1), [0])
    return round(time.perf_counter() - start, 1)


@contextlib.contextmanager
def loglik_spec(model: str, device: str, train, dev: list[dict]):
    """A JobSpec valuing by the dev questions' log-likelihood, the questions also in a temporary file (lm-eval
    reads files) for as long as it is in use."""
    from shed.executors import JobSpec

    with tempfile.TemporaryDirectory() as tmp:
        dev_path = Path(tmp) / "dev.jsonl"
        dev_path.write_text("".join(json.dumps(q) + "\n" for q in dev), encoding="utf-8")
        yield JobSpec(model=model, device=device, dtype="auto", train=train, value="loglik", dev=dev,
                      dev_path=str(dev_path))


def throughput(args, tiny: bool) -> dict:
    import torch

    from shed.synthetic import generate_questions

    if tiny:
        model, cfg = tiny_model(), train_config(TINY_TRAIN)
        device, gpus = "cpu", 0
    else:
        model = args.model or (str(SMOLLM2) if SMOLLM2.is_dir() else SMOLLM2_HUB)
        cfg = train_config({"gradient_checkpointing": args.gradient_checkpointing})
        device, gpus = "cuda", torch.cuda.device_count()
    records, source = pool(args.pool or (str(ALPACA) if not tiny and ALPACA.exists() else None),
                           max(4 * args.records, args.C))
    dev = generate_questions(args.dev, 0, salt=11)
    with loglik_spec(model, device, cfg, dev) as spec:
        per_gpu = [int(w) for w in args.workers.split(",")]
        jobs = make_jobs(records, max(per_gpu) * max(gpus, 1) * args.jobs_per_worker, args.records)
        warmup = make_jobs(records, 1, min(args.records, cfg.batch_size), seed=1)[0]
        figures = {}
        for w in per_gpu:
            count = w * max(gpus, 1)
            print(f"{w} worker(s) per {'GPU' if gpus else 'CPU'}: {count * args.jobs_per_worker} jobs ...", flush=True)
            figures[w] = run_workers(spec, count, jobs[: count * args.jobs_per_worker], warmup)
            f = figures[w]
            print(f"  {f['jobs_per_hour']} jobs/h, {f['train_tokens_per_second']} tokens/s", flush=True)
        one_thread = None
        if tiny and (os.cpu_count() or 1) > 1:  # one worker on one thread: how much of 2-vs-1 is the threads
            one_thread = run_workers(spec, 1, jobs[: args.jobs_per_worker], warmup, threads=1)
        inrun = inrun_seconds(spec, records[: args.C], dev)
    measured = [*figures.values(), *([one_thread] if one_thread else [])]
    reference = figures[per_gpu[0]]["values"]
    same = all(reference.get(k, v) == v for f in measured for k, v in f["values"].items())
    for f in measured:
        del f["values"]
    base = figures[per_gpu[0]]["jobs_per_hour"]
    return {
        "benchmark": "gpu", "mode": "cpu-tiny" if tiny else "gpu",
        "device": torch.cuda.get_device_name(0) if not tiny else f"cpu ({os.cpu_count()} cores)",
        "gpus": gpus, "model": model if not tiny else "tiny Llama (benchmarks/.cache/gpu/tiny-model)",
        "pool": source, "records_per_job": args.records, "dev_questions": len(dev),
        "recipe": recipe_summary(cfg),
        "workers_per_device": {str(w): f for w, f in figures.items()},
        "speedup_vs_first": {str(w): round(f["jobs_per_hour"] / base, 2) for w, f in figures.items()},
        **({"one_worker_one_thread": one_thread} if one_thread else {}),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "same_values": same,
        "C": args.C, "inrun_seconds_for_C_proxies": inrun,
    }


def recipe_summary(cfg) -> dict:
    """The train config as params.yaml spells it, the LoRA targets as a count."""
    from shed.config import as_dict

    out = as_dict(cfg)
    out["lora"] = {k: v for k, v in out["lora"].items() if k != "target_modules"} | {
        "targets": len(cfg.lora.target_modules)}
    return out


# --- the memory model of docs/gpu.md ---------------------------------------------------------------

# Public configs of the presets' models (config.json on the hub) and the benchmark's.
ARCHS = {
    "llama-7b": {"hidden": 4096, "inter": 11008, "layers": 32, "heads": 32, "kv": 32, "vocab": 32000,
                 "params": 6_738_415_616, "family": "llama"},
    "qwen2.5-0.5b": {"hidden": 896, "inter": 4864, "layers": 24, "heads": 14, "kv": 2, "vocab": 151936,
                     "params": 494_032_768, "family": "qwen2"},
    "smollm2-135m": {"hidden": 576, "inter": 1536, "layers": 30, "heads": 9, "kv": 3, "vocab": 49152,
                     "params": 134_515_008, "family": "llama"},
}
PRESETS = [("paper.yaml", "llama-7b"), ("gpu24gb.yaml", "qwen2.5-0.5b"), ("paper.yaml", "smollm2-135m")]


def lora_parameters(arch: dict, r: int) -> int:
    """r x (in + out) per adapted projection, q k v o gate up down, per layer."""
    h, i, kv = arch["hidden"], arch["inter"], arch["hidden"] // arch["heads"] * arch["kv"]
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    return per_layer * arch["layers"]


def _saved_bytes(arch: dict, scale: float, vocab: int, layers: int, tokens: int, lora, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in one forward of `tokens` tokens, outside parameters, under the
    training precision policy (bf16 base, fp32 LoRA, bf16 autocast; run here on the CPU), for the model
    scaled by `scale` (hidden, inner and kv widths and LoRA rank; head width kept), with `vocab` words."""
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from shed.config import TrainConfig
    from shed.training import LoraTrainer

    head_dim = arch["hidden"] // arch["heads"]
    heads, kv = max(1, round(arch["heads"] * scale)), max(1, round(arch["kv"] * scale))
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch["family"] == "qwen2" else (LlamaConfig,
                                                                                             LlamaForCausalLM)
    config = config_cls(vocab_size=vocab, hidden_size=heads * head_dim, num_attention_heads=heads,
                        num_key_value_heads=kv, head_dim=head_dim, intermediate_size=round(arch["inter"] * scale),
                        num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16)
    cfg = dataclasses.replace(TrainConfig(), gradient_checkpointing=checkpointing,
                              lora=dataclasses.replace(lora, r=max(1, round(lora.r * scale))))
    trainer = LoraTrainer(model, None, cfg)
    trainer.model.train()
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, vocab, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer._autocast():
        trainer.model(input_ids=ids, labels=ids, use_cache=False).loss
    return sum(saved.values())


def activation_model(arch: dict, lora, checkpointing: bool, vocab: int = 4096) -> dict:
    """Saved bytes per token: per decoder layer and for the rest (embedding, norms, head, loss). Each is a
    difference over two lengths and two depths, measured at two scales of the widths (and a small
    vocabulary) and extrapolated linearly to the model's widths; the rest's vocabulary term is the
    difference of a second, doubled vocabulary, extrapolated to the model's."""
    per_scale = {}
    scales = [s for s in (1.0, 0.5, 1 / 3, 0.25, 0.125, 1 / 16) if arch["heads"] * s == round(arch["heads"] * s)
              and arch["kv"] * s == round(arch["kv"] * s) and arch["hidden"] * s <= 1024][:2]
    for scale in scales:
        s = {(n, t): _saved_bytes(arch, scale, vocab, n, t, lora, checkpointing) for n in (1, 2) for t in (32, 64)}
        layer = (s[2, 64] - s[1, 64] - s[2, 32] + s[1, 32]) / 32
        rest = (s[1, 64] - s[1, 32]) / 32 - layer
        per_scale[scale] = (layer, rest)
    (s1, (l1, r1)), (s2, (l2, r2)) = sorted(per_scale.items())
    layer = l2 + (l2 - l1) / (s2 - s1) * (1 - s2)
    rest = r2 + (r2 - r1) / (s2 - s1) * (1 - s2)
    small = scales[-1]
    doubled = [_saved_bytes(arch, small, 2 * vocab, 1, t, lora, checkpointing) for t in (32, 64)]
    per_word = ((doubled[1] - doubled[0]) / 32 - l1 - r1) / vocab if small == s1 else \
        ((doubled[1] - doubled[0]) / 32 - l2 - r2) / vocab
    rest += per_word * (arch["vocab"] - vocab)
    if checkpointing:  # a checkpointed layer keeps only its input (bf16 hidden states): torch's hooks never see it
        layer += 2 * arch["hidden"]
    return {"layer": layer, "rest": rest, "per_word": per_word, "scales": scales}


def memory_table(args) -> dict:
    """Per preset and model: weights, LoRA (weights, gradients, AdamW states), activations at the
    micro-batch with every record at the cutoff, with and without gradient checkpointing."""
    from shed.config import LoraConfig

    gib, rows = 2**30, []
    for preset, name in PRESETS:
        train = yaml.safe_load((ROOT / "presets" / preset).read_text(encoding="utf-8"))["train"]
        arch, lora = ARCHS[name], LoraConfig(**train["lora"])
        tokens = train["micro_batch_size"] * train["max_length"]
        lora_params = lora_parameters(arch, lora.r)
        plain, ckpt = activation_model(arch, lora, False), activation_model(arch, lora, True)
        # The loss's transients beyond what autograd saves: the fp32 copy of the logits in the forward,
        # then the fp32 and bf16 gradients of the logits in the backward (~6 bytes per vocabulary entry).
        transient = 6 * arch["vocab"] * tokens
        row = {"preset": preset, "model": name, "micro_batch": train["micro_batch_size"],
               "max_length": train["max_length"], "base_weights_gib": arch["params"] * 2 / gib,
               "lora_parameters_m": lora_params / 1e6,
               "lora_weights_grads_adam_gib": lora_params * 16 / gib,
               "saved_per_token_per_layer_kib": plain["layer"] / 1024,
               "saved_per_token_rest_kib": plain["rest"] / 1024,
               "activations_gib": (tokens * (arch["layers"] * plain["layer"] + plain["rest"]) + transient) / gib,
               "activations_checkpointed_gib": (tokens * (arch["layers"] * ckpt["layer"] + plain["layer"]
                                                          + ckpt["rest"]) + transient) / gib}
        row["total_gib"] = row["base_weights_gib"] + row["lora_weights_grads_adam_gib"] + row["activations_gib"]
        row["total_checkpointed_gib"] = (row["base_weights_gib"] + row["lora_weights_grads_adam_gib"]
                                         + row["activations_checkpointed_gib"])
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(f"{preset:13s} {name:13s} weights {row['base_weights_gib']:.2f} + LoRA/Adam "
              f"{row['lora_weights_grads_adam_gib']:.2f} + activations {row['activations_gib']:.2f} "
              f"(checkpointed {row['activations_checkpointed_gib']:.2f}) GiB", flush=True)
    return {"benchmark": "gpu-memory", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"hub id or local path (default: {SMOLLM2.relative_to(ROOT)}, else "
                        f"{SMOLLM2_HUB})")
    parser.add_argument("--pool", help="a pool file the prepare stage reads (default: the embedded generator)")
    parser.add_argument("--workers", help="workers per GPU to measure (default 1,2,4,8; CPU: 1,2)")
    parser.add_argument("--records", type=int, help="records per job (default 256; CPU: 32)")
    parser.add_argument("--jobs-per-worker", type=int, help="jobs measured per worker (default 2)")
    parser.add_argument("--dev", type=int, help="dev questions scored per job (default 64; CPU: 32)")
    parser.add_argument("--C", type=int, help="proxies for the in-run figure (default 3000; CPU: 64)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="GPU mode: recompute activations")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU mode even where there is a GPU")
    parser.add_argument("--memory", action="store_true", help="print the memory table of docs/gpu.md and exit")
    args = parser.parse_args()
    if args.memory:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(memory_table(args)))
        return
    import torch

    tiny = args.tiny or not torch.cuda.is_available()
    defaults = {"workers": "1,2", "records": 32, "dev": 32, "C": 64, "jobs_per_worker": 2} if tiny else \
        {"workers": "1,2,4,8", "records": 256, "dev": 64, "C": 3000, "jobs_per_worker": 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    out = throughput(args, tiny)
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
