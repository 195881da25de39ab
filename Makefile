# cope_pl — every target works on a fresh clone: the first one run creates .venv and installs.
#   make train                      offline CPU default job: Flip-Flop with CoPE at CPU scale
#   make train CONFIG="a.yaml b.yaml" ARGS="--trainer.max_steps=100"
#   make test | lint | install | clean

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The default job (Flip-Flop, CoPE, CPU scale; prints in-distribution and OOD error): later files override earlier ones.
CONFIG ?= configs/trainer/task_cpu.yaml configs/data/flipflop_cpu.yaml configs/model/task_cpu.yaml configs/position/cope.yaml
ARGS ?=

.PHONY: install train test lint clean

install: $(STAMP)

# GPU machines get the regular (CUDA) torch build; CPU machines the pinned CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch triton; \
	else \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/cope-pl fit $(foreach c,$(CONFIG),--config $(c)) $(ARGS)
	@echo "TensorBoard logs are under runs/ — view them with: $(BIN)/tensorboard --logdir runs"

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check cope_pl tests data_prep
	$(BIN)/ruff format --check cope_pl tests data_prep

clean:
	rm -rf $(VENV) runs lightning_logs reports .pytest_cache .ruff_cache *.egg-info
