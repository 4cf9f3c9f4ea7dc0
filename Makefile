# Two commands do all set-up on a fresh machine:  `make train`  and  `make test`.
# The stack is pinned in requirements/ (cpu.txt; torchrec from nodeps.txt without its CUDA dependency).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/synthetic/hstu-small.yaml
RUN_DIR ?= runs/default
# Allocator: jemalloc (Debian libjemalloc2) when present, else glibc malloc told to keep freed memory (no
# mmap per large tensor, no trimming), which removes most page faults. Since the sampled loss route the training
# step no longer materialises [V, N] temporaries and barely depends on it (docs/performance.md "Training step").
JEMALLOC := $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2)
ifneq ($(JEMALLOC),)
FAST_ENV := LD_PRELOAD=$(firstword $(JEMALLOC)) MALLOC_CONF="oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
else
FAST_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456
endif
PYTEST_ARGS ?=

.PHONY: install train test reproduce-ml1m clean help

help:
	@echo "make train   - set up .venv if needed and train a small HSTU on the embedded synthetic dataset"
	@echo "make test    - set up .venv if needed and run the test suite"
	@echo "make reproduce-ml1m DATA=../shared/data/ml-1m - train SASRec/HSTU/HSTU-large on ML-1M (hours)"

$(STAMP): requirements/cpu.txt requirements/nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

train: install
	$(FAST_ENV) $(VENV)/bin/hstu train --config $(CONFIG) --run-dir $(RUN_DIR)

test: install
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

DATA ?= ../shared/data/ml-1m
reproduce-ml1m: install
	$(FAST_ENV) $(PY) benchmarks/reproduce_ml1m.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
