# Two entry points (see README): `make quickstart` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Retries: CI's network has dropped a large download mid-way (--resume-retries needs pip >= 25.1, so
# the venv's own pip is upgraded first without it).
NET := --retries 10 --resume-retries 20
STAMP := $(VENV)/.installed

.PHONY: install system-packages quickstart test test-fast clean-venv

install: $(STAMP)

# Headless Chromium (Debian package) for the demo's browser test; needs root, as on CI and our machines.
# Where it cannot be installed the browser test skips and says why.
system-packages:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the demo browser test will be skipped"; }

# torch first (the wheels lie on local disk; exact pins avoid multi-GB downloads), then the rest, then
# DeepSpeed, which builds against the installed torch (no build isolation, no compiled ops: JIT on demand).
$(STAMP): requirements.txt requirements-torch.txt requirements-deepspeed.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(NET) -r requirements-torch.txt
	$(PIP) install -q $(NET) -r requirements.txt
	DS_BUILD_OPS=0 $(PIP) install -q $(NET) --no-build-isolation -r requirements-deepspeed.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

quickstart: install
	$(PY) -m parrot.quickstart

test: install system-packages
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
