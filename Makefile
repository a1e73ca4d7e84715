# Two entry points: `make sweep` and `make test`. Both create the virtualenv on first use and install it from
# requirements-lock.txt (every package, direct and transitive, at an exact version), so every machine runs the
# stack the goldens and thresholds were measured on. `make lock` refreshes the lock on purpose.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUITE ?= smoke
ARGS ?=
LOCK := requirements-lock.txt
# The lock is resolved for the machines that run it: CPython 3.11 on x86_64 Linux (glibc >= 2.28).
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
UV_VERSION := 0.13.9

.PHONY: install browser sweep test lock clean

install: $(VENV)/.installed

# The lock alone decides versions (uv installs exactly what it lists); the project itself goes in without
# dependencies so that nothing outside the lock can enter. uv (the version `make lock` uses) instead of pip: on this
# 2-core machine, empty caches, the install took 71 s against pip's ~215 s, the same packages (measured 2026-11-28).
# Keep the byte-compiling (--compile-bytecode, pip's default): without it, where Python writes no bytecode
# (PYTHONDONTWRITEBYTECODE) every process of the tests compiled torch from source on import, and make test took
# 1,698 s instead of 1,148 s (measured with pip's --no-compile).
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -r $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

sweep: install
	$(BIN)/parity sweep --suite $(SUITE) $(ARGS)

test: install browser
	$(BIN)/python -m pytest -q $(ARGS)

# The report tests render report.html in headless Chromium, Debian's `chromium` package (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "make test needs headless Chromium: install your distribution's chromium package (as root: apt-get install chromium)" >&2; exit 2; fi; }

# Re-resolve every package against the index as it is today (within lock-caps.txt), then review the diff:
# a changed torch, diffusers or transformers can move reference numbers (see reference_vs_golden in a sweep).
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/python -m pip install -q uv==$(UV_VERSION); }
	$(BIN)/uv pip compile pyproject.toml --extra test --extra ray $(LOCK_TARGET) -c lock-caps.txt --upgrade \
		--custom-compile-command "make lock" -o $(LOCK)

clean:
	rm -rf reports/*/ .zoo
