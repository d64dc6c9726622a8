# The README's commands. `make run` sets up and starts the product on simulated GPUs;
# `make test` sets up and runs the whole test suite (as root: real users, PAM, ACLs).
VENV ?= .venv
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
SIMULATE ?= {"4090": 4, "a100": 2}
PORT ?= 5151
# Tests run in parallel: most of their time is spent waiting (processes, PAM, databases),
# and each worker has its own users, PAM service, databases and Redis database.
TEST_WORKERS ?= 3

.PHONY: setup run test lint format bench screenshots clean

$(VENV)/.installed: pyproject.toml
	scripts/system-deps.sh run
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/gpulocker serve --simulate '$(SIMULATE)' --host 127.0.0.1 --port $(PORT)

test: setup
	scripts/system-deps.sh test
	scripts/services.sh
	$(VENV)/bin/pytest -n $(TEST_WORKERS)

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix src tests bench scripts
	$(VENV)/bin/ruff format src tests bench scripts

bench: setup
	scripts/services.sh
	for b in bench/bench_*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done

screenshots: setup
	scripts/system-deps.sh test
	$(VENV)/bin/python scripts/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
