# fastmix: the two commands of the README.
#   make train   set up, then run the main job (AutoMix on Fashion-MNIST; a short CPU preset without a GPU)
#   make test    set up, then run the whole test suite
# Set-up is idempotent: a venv in .venv, torch (the CPU build on machines without a GPU),
# fastmix with its test extras, and Fashion-MNIST from Debian's dataset-fashion-mnist.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Without a GPU: the 754 MiB CPU build of torch and the Triton interpreter (environment.md).
TORCH_SPEC  ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TRITON_SPEC ?= $(if $(HAS_GPU),,triton==3.7.1)
TRAIN_ARGS ?=
PYTEST_ARGS ?=
# A second venv for the torchvision / timm paths (tests marked `models`): torchvision cannot
# import beside the CPU build of torch 2.13.0 that the main venv pins, and torch 2.14.1 (the
# stack that has torchvision) needs triton 3.8, against which the kernels' compile check and
# spill table (triton 3.7.1) would have to be redone (README, Tests).
VENV_MODELS ?= .venv-models
PY_MODELS   := $(VENV_MODELS)/bin/python
MODELS_SPEC ?= torch==2.14.1 torchvision==0.29.1 timm

.PHONY: train test test-main test-models setup setup-models data bench bench-data bench-counts study gpu-aot selfcheck clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TRITON_SPEC)
	$(PY) -m pip install -q -e ".[test,dali]"
	touch $@

setup: $(VENV)/.installed

$(VENV_MODELS)/.installed: setup.py Makefile
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	  sys.exit(0 if free >= 7 else f'.venv-models needs about 6 GB of disk (torch 2.14.1 is a CUDA \
	build); {free:.1f} GB free here: free some space, or run make test-main for the main venv only')"
	$(PYTHON) -m venv $(VENV_MODELS)
	$(PY_MODELS) -m pip install -q --upgrade pip
	$(PY_MODELS) -m pip install -q $(MODELS_SPEC)
	$(PY_MODELS) -m pip install -q -e ".[test]"
	touch $@

setup-models: $(VENV_MODELS)/.installed

data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || { echo "could not install dataset-fashion-mnist: install it, or pass --data-dir to train.py"; exit 1; }; \
	fi

train: setup data
	$(PY) train.py --out runs/main --overwrite $(TRAIN_ARGS)

test: test-main
	$(MAKE) test-models

# The main venv's tests (everything but the torchvision / timm ones).
test-main: setup data
	$(PY) -m pytest -q tests bench --benchmark-disable -m "not models" $(PYTEST_ARGS)

# The torchvision / timm tests (peers as oracles, timm and torchvision backbones).
test-models: setup-models
	$(PY_MODELS) -m pytest -q tests -m models $(PYTEST_ARGS)

# The accuracy study (bench/accuracy.py): AutoMix, Mixup, CutMix, vanilla x 3 seeds on the CPU
# protocol; resumable (rerun to continue); writes runs/study/{results.json,results.md,*.png}.
STUDY_ARGS ?=
study: setup data
	$(PY) bench/accuracy.py $(STUDY_ARGS)

bench: setup
	$(PY) bench/kernels.py

# Bytes moved, launches, FLOPs, activation memory and read-backs of every fused op and every
# method's training step at the real shapes, counted on fake tensors (no GPU needed, ~1 min),
# with a roofline model of the GPU time; the tables go to bench/RESULTS.md.
bench-counts: setup
	mkdir -p runs && $(PY) bench/counts.py --json runs/counts.json --results bench/RESULTS.md

# Compile every kernel configuration for sm_80 / sm_90 / sm_100 without a GPU (Triton's compiler
# and ptxas); the resource table goes to bench/gpu_aot_table.md, its summary to bench/RESULTS.md.
gpu-aot: setup
	env -u TRITON_INTERPRET $(PY) bench/gpu_aot.py --full --markdown bench/gpu_aot_table.md --results bench/RESULTS.md

# The first-run self-check: fused kernels against their eager twins (and timings on a GPU).
selfcheck: setup
	mkdir -p runs && $(PY) -m fastmix.selfcheck --out runs/selfcheck.json

# DALI (CPU or GPU), torchvision.io and PIL in one run: the torchvision venv, with DALI added.
bench-data: setup-models
	$(PY_MODELS) -m pip install -q -e ".[dali]"
	$(PY_MODELS) bench/data.py --data-dir runs/photo-jpegs --synthetic 512

clean:
	rm -rf $(VENV) $(VENV_MODELS) runs .pytest_cache *.egg-info
