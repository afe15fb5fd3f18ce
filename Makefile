# Two commands for a fresh machine; each installs what it needs into .venv first.
#   make demo   - make a phantom z-stack, describe it, draw it
#   make test   - the test suite (what CI runs)
# torch is pinned by constraints.txt to the local CPU wheel; a GPU machine installs without it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/volref synth $(DEMO)/phantom.ome.zarr --shape 48 512 512 --density 1.2 \
		--degraded-fraction 0.3 --seed 5 --overwrite
	$(VENV)/bin/volref info $(DEMO)/phantom.ome.zarr
	$(VENV)/bin/volref snapshot $(DEMO)/phantom.ome.zarr $(DEMO)/phantom.png

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .hypothesis
