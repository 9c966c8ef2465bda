# The README's commands. Each target creates .venv if it is missing and installs
# what it needs, so `make train` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEVICES ?= 8

.PHONY: train test test-slow lint docs docs-serve bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per set of extras; re-installs when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[$(subst +,$(comma),$*)]"
	@touch $@

comma := ,

train: $(VENV)/.stamp-examples
	$(PY) examples/train_transformer.py --devices $(DEVICES)

test: $(VENV)/.stamp-dev+examples+docs
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

# Exit code 5 means "no test was marked slow", which is fine.
test-slow: $(VENV)/.stamp-dev+examples+docs
	$(PY) -m pytest -q -m slow -n 2 --dist loadfile || [ $$? -eq 5 ]

lint: $(VENV)/.stamp-dev
	$(PY) -m ruff check eqxpar models examples benchmarks tests
	$(PY) -m ruff format --check eqxpar models examples benchmarks tests
	$(PY) -m pyright

# MathJax for the site, so that its maths renders offline (docs/hooks.py copies it into
# the build); without npm the pages load MathJax from its CDN instead.
MATHJAX := $(VENV)/mathjax/node_modules/mathjax/es5/tex-mml-chtml.js
$(MATHJAX): | $(PY)
	-command -v npm >/dev/null && npm install --silent --no-audit --no-fund --prefix $(VENV)/mathjax mathjax@3

docs: $(VENV)/.stamp-docs $(MATHJAX)
	$(PY) -m mkdocs build --strict

docs-serve: $(VENV)/.stamp-docs $(MATHJAX)
	$(PY) -m mkdocs serve

bench: $(VENV)/.stamp-examples
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache
