PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-cuda test test-slow lint clean run train sample-eval eval eval-multiprompt bench
RUNS ?= runs

# CPU set-up: torch==2.13.0 is the CPU build; install it before anything that depends on torch
# so that pip never resolves a (multi-GB) CUDA build.
$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

setup: $(VENV)/.done

# GPU set-up: PyPI's default Linux torch wheel is a CUDA build; install it first, then the project.
setup-cuda:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install 'torch>=2.6'
	$(PIP) install -e '.[dev]'
	touch $(VENV)/.done

test: setup
	$(PY) -m pytest -q -x --durations=10

test-slow: setup
	$(PY) -m pytest -q -m slow

# The main job on the built-in default: train on the synthetic world, sample two videos of each of its
# 32 captions from the new run, and print the evaluator's accuracy table.
run: setup train sample-eval eval

# compile_model=true: the compiled DiT trains the default 1.1-1.3x faster on 2 CPU cores (bench/train_speed.py).
# TRAIN_PRECISION: bf16 autocast where the CPU computes bf16 natively (AVX512-BF16 or AMX), which trains the
# default 1.5x faster again; float32 ("no") elsewhere, where bf16 would be emulated. Override it on the command
# line (make train TRAIN_PRECISION=no); on a GPU use bf16.
TRAIN_PRECISION ?= $(shell grep -qsE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo bf16 || echo no)
train: setup
	$(PY) train.py runs_root=$(RUNS) compile_model=true mixed_precision=$(TRAIN_PRECISION)

sample-eval: setup
	mkdir -p $(RUNS)
	$(PY) -c "from vdm.data.synthetic import CAPTIONS; print(chr(10).join(CAPTIONS))" > $(RUNS)/captions.txt
	$(PY) sample.py runs_root=$(RUNS) prompts_file=$(RUNS)/captions.txt num_samples=2

# Score the newest samples folder (override with SAMPLES=<folder or samples.jsonl>).
eval: setup
	$(PY) -m vdm.eval.synthetic $${SAMPLES:-$$(ls -td $(RUNS)/*/samples/*/ | head -1)}

# Multi-prompt (DiTCtrl) test bed on the latest run: two- and three-prompt videos with plain attention (base),
# KV-sharing and mask-guided KV-sharing (on the colour and shape tokens) side by side, in the run's layout and
# in the reference's (its stride of 4 latent frames with 2 transition blocks: overlap 9 of 13 at CogVideoX
# scale, 5 of the synthetic world's 9), scored by vdm.eval.multiprompt.
MP_DIR := $(RUNS)/multiprompt-$(shell date +%Y%m%d-%H%M%S)
MP_CONTROLS = 'adaln=[base,kv_sharing,kv_sharing_mask_guided]' 'control_options.ref_token_idx=[2,3]' 'control_options.cur_token_idx=[2,3]'
eval-multiprompt: setup
	mkdir -p $(RUNS)
	$(PY) -c "from vdm.eval.multiprompt import cases; print(chr(10).join(cases()))" > $(RUNS)/multiprompt.txt
	$(PY) sample.py runs_root=$(RUNS) prompts_file=$(RUNS)/multiprompt.txt $(MP_CONTROLS) output_dir=$(MP_DIR)/run_layout
	$(PY) sample.py runs_root=$(RUNS) prompts_file=$(RUNS)/multiprompt.txt $(MP_CONTROLS) overlap_size=5 \
		num_transition_blocks=2 output_dir=$(MP_DIR)/reference_layout
	$(PY) -m vdm.eval.multiprompt $(MP_DIR)/run_layout $(MP_DIR)/reference_layout

bench: setup
	$(PY) bench/multiprompt.py

lint: setup
	$(PY) -m ruff check vdm tests train.py sample.py

clean:
	rm -rf $(VENV) outputs multirun
