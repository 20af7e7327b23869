# Two entry points (see README): `make demo` (main job on the embedded sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.installed
# where pip finds the CPU-only torch of requirements-serve.txt when no local wheel folder has it
TORCH_INDEX ?=
# the bundle serve-check measures (default: the benchmark's own, built with the training env into runs/serve-check)
SERVE_BUNDLE ?= runs/serve-check/bundle

.PHONY: setup demo test clean-demo gpu-check gpu-wheels serve-env serve-check

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
# calibrate, serve it over ZeroMQ and stream the sample frames through it from two cameras
# (scripts/line_demo.py). The times are those measured on 2 CPU cores shared with other work.
demo: setup
	@echo "make demo: about 30 min on 2 CPU cores, measured while other jobs shared them (train 25, test 1.5, export + calibrate 2, line 1)."
	@echo "Interrupt it at any time: a rerun resumes the training, and skips it once done (make clean-demo starts over)."
	@echo ""
	@echo "[1/4] train a small DiAD on data/mtd_sample (40 normal images): 200 autoencoder, 300 UNet, 200 SG steps,"
	@echo "      then the bank of normal features the edge preset scores against"
	$(PY) -m edgeinspect.cli train diad --config configs/demo.yaml --run runs/demo --resume
	@echo ""
	@echo "[2/4] score the 20 test images with the trained run (torch): offline metrics and heat maps"
	$(PY) -m edgeinspect.cli test --model runs/demo --data data/mtd_sample --out runs/demo/metrics.json \
		--overlays runs/demo/overlays > runs/demo/metrics.txt
	@echo "offline metrics (1.0 = perfect, 0.5 = chance; image: is the frame defective, pixel: where; all in runs/demo/metrics.json):"
	@cat runs/demo/metrics.txt
	$(PY) scripts/line_demo.py --run runs/demo --data data/mtd_sample

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

# The lean serving environment for a line PC (requirements-serve.txt: CPU torch, onnxruntime, no training
# stack) and edgeinspect without its dependencies; the daemon is then `$(SERVE_VENV)/bin/edgeinspect-line serve
# --bundle BUNDLE` (the full `edgeinspect` command needs the training env).
serve-env: $(SERVE_STAMP)

$(SERVE_STAMP): requirements-serve.txt pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install --quiet --upgrade pip
	$(SERVE_PY) -m pip install --quiet -r requirements-serve.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(SERVE_PY) -m pip install --quiet --no-deps -e .
	touch $(SERVE_STAMP)

# The daemon's memory in the serving env (idle, under a 10x overload, where it goes): benchmarks/serve.py drives
# it from .venv and runs the daemon with $(SERVE_PY) -> benchmarks/results/serve_<machine>.md/.json. The
# benchmark bundle (edge DiAD, 1 training step per stage, ONNX fp32) is built first when SERVE_BUNDLE is missing.
serve-check: setup serve-env
	test -f $(SERVE_BUNDLE)/manifest.json || $(PY) benchmarks/serve.py --make-bundle $(dir $(SERVE_BUNDLE))
	$(PY) benchmarks/serve.py --bundle $(SERVE_BUNDLE) --env $(SERVE_VENV) --threads 2 --frames 300 --overload-s 60
