"""DSIR baseline (Xie et al. 2023) through the `data-selection` package: hashed n-gram importance
weights of pool records toward a target text distribution (here: the dev questions).

The package's own `resample` draws Gumbel noise from numpy's global RNG; `sampling.dsir_sample`
makes the same Gumbel top-k draw with a seeded generator instead.
"""

from __future__ import annotations

import tempfile

import numpy as np

NGRAMS = 2  # unigrams and bigrams, the package default
BUCKETS = 10000


def log_importance_weights(raw: list[str], target: list[str]) -> np.ndarray:
    """log p_target(x) - log p_raw(x) under hashed n-gram bag-of-words models, one per raw text."""
    from data_selection import HashedNgramDSIR

    with tempfile.TemporaryDirectory(prefix="shed-dsir-") as cache:
        # In-memory "datasets": each path names a list; num_proc=1 keeps joblib in this process.
        texts = {"raw": raw, "target": target}
        dsir = HashedNgramDSIR(["raw"], ["target"], cache, raw_load_dataset_fn=texts.__getitem__,
                               raw_parse_example_fn=str, target_load_dataset_fn=texts.__getitem__,
                               target_parse_example_fn=str, num_proc=1, ngrams=NGRAMS, num_buckets=BUCKETS,
                               min_example_length=0)
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        return np.array([dsir.importance_estimator(dsir.featurizer(t)) for t in raw], dtype=float)

