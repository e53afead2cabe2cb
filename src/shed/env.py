"""The numerical environment: CPU kernels pinned so that every x86-64 machine computes the same bytes.

`pin()` runs first thing in `shed` (src/shed/cli.py, before numpy and torch load: the libraries read
these variables when they load), so `dvc repro` and a stage run by hand compute alike. It acts only
with SHED_PIN_KERNELS=1 (`SHED_PIN_KERNELS=1 dvc repro`: slower, see pin) and only sets defaults: a
variable already set wins.

Why: torch picks its kernels by the CPU's instruction set (ATen's AVX-512 / AVX2 / default builds,
MKL's GEMM branches, oneDNN's JIT kernels), and kernels of different widths add the same numbers in
different orders. The results differ in the last bits, and a training run (the base model's
pretraining, every fine-tune) grows those bits into different models. Pinned here:

- ATEN_CPU_CAPABILITY=avx2: ATen's element-wise ops and reductions (softmax, norms, sums) use their
  AVX2 build on every machine that has AVX2 (the same instructions give the same bits).
- MKL_CBWR=AVX2: MKL's matrix products take its AVX2 branch in conditional-reproducibility mode, the
  same on every Intel CPU with AVX2 (~1.3x the CPU time of MKL's AVX-512 kernels). MKL runs its own
  code on AMD CPUs whatever this says; only MKL_CBWR=COMPATIBLE (SSE2) is documented as equal on
  Intel and AMD, at ~3x the CPU time of the model stages, so it is left to the user.
  MKL_ENABLE_INSTRUCTIONS=AVX2 too: MKL lets an explicit AVX512 there override the CBWR branch.
- ONEDNN_MAX_CPU_ISA=AVX2: oneDNN kernels (torch's GELU, in MiniLM) no wider than AVX2.
- OPENBLAS_CORETYPE=Haswell: numpy's and scipy's OpenBLAS (k-means, the PCA of plots/clusters.png) use
  its AVX2 kernels, as on AMD Zen, instead of its AVX-512 ones.
- threads: torch's reductions, MKL's GEMM and scikit-learn's k-means split work by thread count,
  so the default (all cores) would tie the bytes to the core count; THREADS threads are the default
  instead (SHED_THREADS overrides; OMP_NUM_THREADS and MKL_NUM_THREADS are set from it).

What this cannot promise: AMD CPUs (MKL, above), CUDA/MPS devices (other kernels altogether), CPUs
without AVX2 or non-x86 CPUs (ARM: no MKL), other versions of torch, MKL, numpy or the model
libraries, and a different thread count. `describe()` records these in every stage's metrics.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

THREADS = 2
OPT_IN = "SHED_PIN_KERNELS"
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # an explicit AVX512 here would override MKL_CBWR's branch
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
LIBRARIES = ("torch", "transformers", "peft", "sentence-transformers", "numpy", "scikit-learn")


def threads() -> int:
    """Compute threads per process: SHED_THREADS, else OMP_NUM_THREADS, else THREADS."""
    for var in ("SHED_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return THREADS


def pin() -> None:
    """With SHED_PIN_KERNELS=1: set the kernel and thread defaults (before torch is imported; values
    already set are kept). Opt-in: with MKL_CBWR=COMPATIBLE (the first pin) the model stages took about
    3x the CPU time, past the demo's budget; with MKL's AVX2 branch about 1.1-1.3x (docs/method.md)."""
    if os.environ.get(OPT_IN) != "1":
        return
    for var, value in PINNED.items():
        os.environ.setdefault(var, value)
    n = str(threads())
    for var in THREAD_VARS:
        os.environ.setdefault(var, n)


def describe(device: str | None = None) -> dict:
    """What determined a stage's numbers: library versions, kernels and threads in use, device.

    Values are lists of strings, stable across reruns on one machine: the file and its diffs show them,
    while `dvc exp show` / `dvc metrics show` (which skip lists) keep to the results.
    """
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    kernels = [f"{var}={os.environ[var]}" for var in (*PINNED, *THREAD_VARS) if var in os.environ]
    torch = sys.modules.get("torch")  # only stages that load a model import torch; never imported here
    if torch is not None:
        kernels.append(f"torch cpu capability in use: {torch.backends.cpu.get_cpu_capability()}")
        kernels.append(f"torch threads: {torch.get_num_threads()}")
    if device in (None, "auto"):  # as shed.models.resolve_device picks it
        device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    return {"versions": [f"python=={sys.version.split()[0]}", *versions], "kernels": kernels, "device": [device]}
