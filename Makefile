# Two commands set up a fresh machine: `make run` (install + launch the app on the demo model) and
# `make test` (install + lint + run the tests); `make check` is the quick inner loop (lint + the tests that are not
# marked slow, browser or gpu). Each step leaves a stamp, so a second call reinstalls nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The package set this machine gets (scripts/setup_plan.py): rewritten only when it changes, e.g. after a driver update.
PLAN := $(VENV)/.setup-plan
CONVERTER := vendor/llama.cpp/convert_hf_to_gguf.py
# Unpacked with the converter; a checkout set up before the vocabularies were added gets them on its next `make`.
VOCAB := vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf
BROWSER := /usr/bin/chromium
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: run test check setup lint audit clean FORCE

run: setup
	HF_HUB_OFFLINE=1 $(PY) main.py demo-model
	$(PY) main.py

# Tests stay off the Hub (they use tests/fake_hub.py); `make run` and `python main.py` reach it.
test: lint $(BROWSER)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# The inner loop: lint, then the tests not marked slow, browser or gpu (pytest.ini says what each mark means).
check: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow and not browser and not gpu"

setup: $(INSTALLED) $(CONVERTER) $(VOCAB)

# A CUDA GPU gets requirements-gpu.txt (Unsloth, bitsandbytes) and llama.cpp with CUDA when nvcc is on PATH; any
# other machine, or FINETUNER_SETUP=cpu, gets requirements.txt. The script prints each decision and why.
$(INSTALLED): requirements.txt requirements-gpu.txt scripts/setup_plan.py $(PLAN)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PYTHON) scripts/setup_plan.py --install $(PY)
	touch $@

$(PLAN): FORCE
	@$(PYTHON) scripts/setup_plan.py --record $@

# llama.cpp's converter is not a PyPI module: take it from the sdist of the installed llama-cpp-python.
$(CONVERTER) $(VOCAB) &: $(INSTALLED)
	$(PY) scripts/fetch_converter.py vendor
	touch $(CONVERTER) $(VOCAB)  # the unpacked files keep the sdist's old date: every call would fetch them again

# Debian's Chromium for the browser tests (Playwright cannot download its own browser here).
$(BROWSER):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Known vulnerabilities in the pinned requirements (PyPI's advisory data). It needs the network, so it is not part of
# `make test`; it fails when a package could not be audited as well as on a finding.
audit: setup
	$(PY) scripts/audit.py requirements.txt

clean:
	rm -rf $(VENV) vendor
