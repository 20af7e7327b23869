# Two entry points (see README): `make demo` (main job on the embedded sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-demo gpu-check gpu-wheels

setup: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are what timm needs; pip takes them from the local wheel cache
# where there is one, else from PyPI.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Main job, the line in miniature: train a small DiAD on data/mtd_sample (resumes if interrupted,
# skips if already trained), score its test split (metrics + heat maps), then export it to a bundle,
# calibrate, serve it over ZeroMQ and stream the sample frames through it from two cameras.
demo: setup
	$(PY) -m edgeinspect.cli train diad --config configs/demo.yaml --run runs/demo --resume
	$(PY) -m edgeinspect.cli test --model runs/demo --data data/mtd_sample --out runs/demo/metrics.json \
		--overlays runs/demo/overlays
	$(PY) scripts/line_demo.py --run runs/demo --data data/mtd_sample
	@echo "offline heat maps: runs/demo/overlays/  line heat maps: runs/demo/line_overlays/"

test: setup
	$(PY) -m pytest -q

clean-demo:
	rm -rf runs/demo

# One-go GPU check on a machine with an NVIDIA GPU (benchmarks/gpu_check.py): environment, small DiAD and
# GLAD runs, bundles, TensorRT fp16/int8 engines, parity against onnxruntime on the CPU, per-stage latency
# -> benchmarks/results/latency_<gpu>.md/.json (and the log), copied to OUT when given; at most 8 minutes.
# It makes or picks its own environment, so it runs with the machine's python3, not with .venv.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py check $(if $(OUT),--out $(OUT))

# Here, before a lent GPU machine's call: the wheels its image lacks, into .whl/ (git-ignored) to carry.
gpu-wheels: setup
	$(PY) benchmarks/gpu_check.py wheels
