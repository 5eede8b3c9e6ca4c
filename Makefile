# mlas-lora: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
CONFIG ?= configs/demo.yaml

.PHONY: setup test test-slow lint format demo bench

setup:  ## install torch (CPU build, pinned) first, then the package with its dev extras
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch
	$(PIP) install -q -e '.[dev]'

test: setup
	$(PYTHON) -m pytest -q

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

format:
	ruff format src tests benchmarks
	ruff check --fix src tests benchmarks

demo: setup  ## builds the corpus and the embedded models once, then runs the main job
	mlas-lora data build
	mlas-lora models prepare qwen2.5-coder-0.5b-instruct
	mlas-lora models prepare qwen2.5-coder-1.5b-instruct
	mlas-lora run $(CONFIG)

bench: setup  ## run one at a time on an otherwise idle machine (see benchmarks/README.md)
	cd benchmarks && $(PYTHON) bench_scoring.py --model qwen2.5-coder-1.5b-instruct --sentences 8 --tokens 48
	cd benchmarks && $(PYTHON) bench_training.py
	cd benchmarks && $(PYTHON) bench_generation.py
	cd benchmarks && $(PYTHON) bench_roofline.py
	cd benchmarks && $(PYTHON) bench_translate.py --per-pair 50
