# cope_pl — every target works on a fresh clone: the first one run creates .venv and installs.
#   make train                      offline CPU default job: Flip-Flop with CoPE at CPU scale
#   make train CONFIG="a.yaml b.yaml" ARGS="--trainer.max_steps=100"
#   make bench [BENCH_ARGS="--lengths 256 512 --repeats 3"]   timing/memory tables -> reports/bench/
#   make bench-kernels [KERNEL_ARGS="--sep-keys"]               fused-kernel register/spill table, no GPU needed
#   make bench-gpu [GPU_ARGS="--minutes 8"]                     every GPU check of the fused kernel -> reports/gpu_check/
#   make ablation SWEEP=configs/sweeps/table2_cpu.yaml [SLURM=1]   run a sweep (or write/submit a SLURM array)
#   make report RUNS=runs/ OUT=reports/                           tables and figures from finished runs
#   make plan CONFIG="a.yaml b.yaml" [PLAN_ARGS="--gpu h200"]      GPU memory, kernels and step time, no GPU needed
#   make test | lint | install | clean
#   make data-wikitext | data-code  prepare the LM corpora (DATA_CONFIG="configs/data/....yaml" to choose)
#   make data-wikitext ARGS="--data-dir /data/wikitext-103"   flags of data_prep/prepare_*.py override the config

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The default job (Flip-Flop, CoPE, CPU scale; prints in-distribution and OOD error): later files override earlier ones.
CONFIG ?= configs/trainer/task_cpu.yaml configs/data/flipflop_cpu.yaml configs/model/task_cpu.yaml configs/position/cope.yaml
ARGS ?=
# Full sweep by default (CPU: T=256..4096, tens of minutes on 2 cores); e.g. BENCH_ARGS="--lengths 256 1024".
BENCH_ARGS ?=
KERNEL_ARGS ?=
GPU_ARGS ?=
PLAN_ARGS ?=

SWEEP ?=
SLURM ?=
RUNS ?= runs
OUT ?= reports

.PHONY: install train test lint clean bench bench-kernels bench-gpu data-wikitext data-code ablation report plan

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
	$(BIN)/python -c "from cope_pl.ops.cope_cpu import report_build; report_build()"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/cope-pl fit $(foreach c,$(CONFIG),--config $(c)) $(ARGS)
	@echo "TensorBoard logs are under runs/ — view them with: $(BIN)/tensorboard --logdir runs"

# Tokenize a language-modelling corpus into data_cache/ once, e.g. on a login node before a cluster job.
data-wikitext: $(STAMP)
	$(BIN)/python data_prep/prepare_wikitext.py --config $(or $(DATA_CONFIG),configs/data/wikitext103.yaml) $(ARGS)

data-code: $(STAMP)
	$(BIN)/python data_prep/prepare_code.py --config $(or $(DATA_CONFIG),configs/data/code.yaml) $(ARGS)
# SLURM=1 writes an array job script (one task per cell) and submits it when sbatch is on PATH.
ablation: $(STAMP)
	@test -n "$(SWEEP)" || { echo "usage: make ablation SWEEP=configs/sweeps/<file>.yaml [SLURM=1]"; exit 2; }
	$(BIN)/cope-pl sweep $(SWEEP) $(if $(SLURM),--slurm $(if $(shell command -v sbatch),--submit))

report: $(STAMP)
	$(BIN)/cope-pl report $(RUNS) --out $(OUT)

# What CONFIG would do on a GPU (peak memory, kernels per step, step time), traced on fake tensors here.
plan: $(STAMP)
	$(BIN)/cope-pl plan $(foreach c,$(CONFIG),--config $(c)) $(ARGS) $(PLAN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m cope_pl.bench $(BENCH_ARGS)

# On a CUDA machine: accuracy, op and training-step benchmarks, profile and kernel tests in one call (summary.md).
bench-gpu: $(STAMP)
	$(BIN)/python -m cope_pl.bench.gpu_check $(GPU_ARGS)

# Compiles the fused Triton kernels for sm_90 (needs triton, not a GPU): ptxas registers/spills per tile candidate.
bench-kernels: $(STAMP)
	$(BIN)/python -m cope_pl.bench.kernel_stats $(KERNEL_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cope_pl tests data_prep
	$(BIN)/ruff format --check cope_pl tests data_prep

clean:
	rm -rf $(VENV) runs lightning_logs reports .pytest_cache .ruff_cache *.egg-info
