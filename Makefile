# fastmix: the two commands of the README.
#   make train   set up, then run the main job (AutoMix on Fashion-MNIST; a short CPU preset without a GPU)
#   make test    set up, then run the whole test suite
# Set-up is idempotent: one venv in .venv with the pinned stack (below), fastmix with its
# test extras (DALI included), and Fashion-MNIST from Debian's dataset-fashion-mnist.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
# One pinned stack for CPU and GPU alike: torch 2.14.1 (its CUDA build also runs on the CPU),
# torchvision 0.29.1, timm, and the triton 3.8.0 that torch 2.14.1 requires (the kernels'
# compile check and spill table are for it). Another torch: override TORCH_SPEC (and
# TRITON_SPEC to the triton that torch requires).
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
TRITON_SPEC ?= triton==3.8.0
TRAIN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test setup data bench bench-data bench-counts study study-mismatch gpu-aot selfcheck clean

$(VENV)/.installed: setup.py pyproject.toml Makefile
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	  sys.exit(0 if free >= 7 else f'the venv needs about 6.5 GB of disk (torch 2.14.1 is a \
	CUDA build); {free:.1f} GB free here')"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) $(TRITON_SPEC)
	$(PY) -m pip install -q -e ".[test,dali]"
	touch $@

setup: $(VENV)/.installed

data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || { echo "could not install dataset-fashion-mnist: install it, or pass --data-dir to train.py"; exit 1; }; \
	fi

train: setup data
	$(PY) train.py --out runs/main --overwrite $(TRAIN_ARGS)

test: setup data
	$(PY) -m pytest -q tests bench --benchmark-disable --durations=20 $(PYTEST_ARGS)

# The accuracy study (bench/accuracy.py): AutoMix, Mixup, CutMix, vanilla x 3 seeds on the CPU
# protocol; resumable (rerun to continue); writes runs/study/{results.json,results.md,*.png}.
# study: the same-encoder grid (every method with an EMA head; docs/study/PROTOCOL.md).
# study-mismatch: off-centre objects (docs/study-mismatch/PROTOCOL.md), then its mask diagnostics.
STUDY_ARGS ?=
study: setup data
	$(PY) bench/accuracy.py --ema --out runs/study $(STUDY_ARGS)

study-mismatch: setup data
	$(PY) bench/accuracy.py --dataset fashion-mnist-offcentre --ema --epochs 100 \
	    --methods vanilla,mixup,cutmix,saliencymix,puzzlemix,automix --out runs/study-mismatch $(STUDY_ARGS)

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

# DALI (CPU or GPU), torchvision.io and PIL in one run.
bench-data: setup
	$(PY) bench/data.py --data-dir runs/photo-jpegs --synthetic 512

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
