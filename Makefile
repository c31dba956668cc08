# Thin wrapper: bootstrap .venv, then hand over to pytest / the mbe-book CLI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
PROFILE ?= default
export PATH := $(BIN):$(PATH)

.PHONY: all venv browser test book lab bench clean

all: test

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[book,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mbe-book)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# Debian's Chromium for the browser tests of the built site (skipped where it cannot be had).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: the browser tests will skip"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest

book: $(STAMP)
	$(BIN)/mbe-book build --profile $(PROFILE)

# JupyterLab refuses to start as root without --allow-root (containers, CI machines).
lab: $(STAMP)
	$(BIN)/jupyter lab book/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

bench: $(STAMP)
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf _build results
