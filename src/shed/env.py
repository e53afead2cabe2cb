"""The numerical environment: CPU kernels pinned so that every x86-64 machine computes the same bytes.

`pin()` runs first thing in `shed` (src/shed/cli.py, before numpy and torch load: the libraries read
these variables when they load), so `dvc repro` and a stage run by hand compute alike. It acts only
with SHED_PIN_KERNELS=1 (`SHED_PIN_KERNELS=1 dvc repro`: slower, see pin) and only sets defaults: a
variable already set wins.

Why: torch picks its kernels by the CPU's instruction set (ATen's AVX-512 / AVX2 / default builds, and
MKL's GEMM branches), and kernels of different widths add the same numbers in different orders. The
results differ in the last bits, and a training run (the base model's pretraining, every fine-tune)
grows those bits into different models. Pinned here:

- ATEN_CPU_CAPABILITY=avx2: ATen's element-wise ops and reductions (softmax, norms, GELU, sums) use
  their AVX2 build on every machine that has AVX2 (the same instructions give the same bits).
- MKL_CBWR=COMPATIBLE: MKL's matrix products take its SSE2 branch, the one branch MKL promises to
  give the same results on Intel and AMD CPUs (its AVX2 branch is Intel-only: AMD gets the auto one).
- ONEDNN_MAX_CPU_ISA=AVX2: oneDNN kernels (some of MiniLM's matmuls) no wider than AVX2.
- OPENBLAS_CORETYPE=Haswell: numpy's and scipy's OpenBLAS (k-means, the PCA of plots/clusters.png) use
  its AVX2 kernels, as on AMD Zen, instead of its AVX-512 ones.
- threads: torch's reductions, MKL's SSE2 GEMM and scikit-learn's k-means split work by thread count,
  so the default (all cores) would tie the bytes to the core count; THREADS threads are the default
  instead (SHED_THREADS overrides; OMP_NUM_THREADS and MKL_NUM_THREADS are set from it).

What this cannot promise: CUDA/MPS devices (other kernels altogether), CPUs without AVX2 or non-x86
CPUs (ARM: no MKL, other kernels), other versions of torch, MKL or the model libraries, and a
different thread count. `describe()` records all of these in every stage's metrics.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

THREADS = 2
OPT_IN = "SHED_PIN_KERNELS"
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
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
    already set are kept). Opt-in: pinned kernels made the embedded default's base pretraining about 7x
    slower on 2 cores (0.38 -> 2.8 s a step, measured under load), past the demo's time budget."""
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
