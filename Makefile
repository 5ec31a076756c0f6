# Two commands on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
# The first Python 3.12 that really runs (pyenv's shim for python3.12 may exist and fail).
PYTHON_NEWEST ?= $(shell for p in $$HOME/.pyenv/versions/3.12*/bin/python3 python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
VENV_NEWEST := .venv-newest
PY := $(VENV)/bin/python
PY_NEWEST := $(VENV_NEWEST)/bin/python
PYTEST_ARGS ?= -n 2 --dist worksteal

.PHONY: demo test test-newest lint docs bench mutation clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The docs extra (mkdocs, mkdocs-material, mkdocstrings-python), added to the same .venv.
$(VENV)/.installed-docs: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

# The newest JAX release, on Python 3.12 (pyenv's), for `.ci/run`.
$(VENV_NEWEST)/.installed: pyproject.toml
	@test -n "$(PYTHON_NEWEST)" || { echo "make test-newest needs Python 3.12 (pyenv install 3.12, or PYTHON_NEWEST=...)"; exit 1; }
	$(PYTHON_NEWEST) -m venv $(VENV_NEWEST)
	$(PY_NEWEST) -m pip install --quiet --upgrade pip
	$(PY_NEWEST) -m pip install --quiet --upgrade -e '.[test]' jax jaxlib
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -c "import jax; print('jax', jax.__version__)"
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-newest: $(VENV_NEWEST)/.installed
	$(PY_NEWEST) -c "import jax; print('jax', jax.__version__)"
	$(PY_NEWEST) -m pytest $(PYTEST_ARGS) tests

# ruff (lint and format) and pyright (basic), configured in pyproject.toml.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check scgjax tests examples benchmarks docs/*.py
	$(VENV)/bin/ruff format --check scgjax tests examples benchmarks docs/*.py
	$(VENV)/bin/pyright

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a warning (a broken link
# or anchor, a docstring griffe cannot parse, a missing snippet) fails the build.
# NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2.0, printed on every build.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py

# Break each rule in turn and check that the suite notices (tests/MUTATION.md);
# MUTANTS=term:sub: (a prefix) or names to run some.
mutation: $(VENV)/.installed
	$(PY) tests/mutation.py $(MUTANTS)

clean:
	rm -rf $(VENV) $(VENV_NEWEST) build dist site *.egg-info
