# The README's two commands: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench notebooks nbdev-test mutation clean

$(STAMP): settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fastkd demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)  # each writes its table to bench/results/
	$(BIN)/python bench/kd_overhead.py
	$(BIN)/python bench/heavy_teacher.py
	$(BIN)/python bench/tta_sweep.py
	$(BIN)/python bench/prepare_gtsrb.py

notebooks: $(STAMP)  # executes nbs/*.ipynb at their default settings and writes their outputs
	$(BIN)/python nbs/run_notebooks.py

nbdev-test: $(STAMP)  # every notebook at its defaults, outputs not written; 01 needs FASTKD_GTSRB (see the notebook)
	cd nbs && ../$(BIN)/nbdev-test . --timing  # run from nbs/: nbdev 3 reads nbs/pyproject.toml and refuses settings.ini

mutation: $(STAMP)  # mutmut over the core modules, each against its own tests (an hour or more: not in CI)
	$(BIN)/python bench/mutation.py

clean:
	rm -rf $(VENV) build dist *.egg-info
