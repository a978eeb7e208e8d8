# Entry points. `make run` and `make test` set everything up from a fresh clone first.
# QSTAR_DATA_DIR: a folder with local copies of the data sets (gsm8k/, csqa/, c4/); where it is
# unset, hub ids are streamed from the Hugging Face hub. On the project's build machines the
# copies live in ../shared/data, used when present.
SHELL := /bin/bash
VENV := .venv/bin
export QSTAR_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup run train test test-all bench reports chromium lint format

setup:
	@bash scripts/setup.sh

# The main job: the smoke sweep on the default model (Ray Tune, about 5 min on 2 CPU cores), then its report.
run: setup
	@name=smoke-$$(date +%Y%m%d-%H%M%S); \
	$(VENV)/qstar sweep sweeps/smoke.yaml --name $$name && \
	$(VENV)/qstar report experiments/$$name --out reports/$$name

train: setup
	$(VENV)/qstar train smollm2_math

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/python -m pytest -q

test-all: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/python -m pytest -q -m "slow or not slow"

bench: setup
	$(VENV)/qstar bench --out reports/bench

# Re-render every committed report under reports/ (not archive/, bench/) from its committed data
# bundle reports/NAME/data (with reports/NAME/reading.md when present), then list any report that
# does not regenerate or any broken link; afterwards `git status` shows no change.
reports: setup
	$(VENV)/python -m qstar.analysis.bundle reports

lint: setup
	$(VENV)/ruff check qstar tests
	$(VENV)/ruff format --check qstar tests

format: setup
	$(VENV)/ruff format qstar tests
	$(VENV)/ruff check --fix qstar tests

# Headless Chromium for the thought viewer's browser test (tests/test_viewer.py skips without it).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
