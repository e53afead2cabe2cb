"""shed: SHED (Shapley-based automated dataset refinement, NeurIPS 2024) as a reproducible DVC pipeline."""

__version__ = "0.1.0"
