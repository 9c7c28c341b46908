# pneumoct: `make demo` and `make test` are all a user needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test bench clean

# constraints.txt pins torch to the local CPU build so no dependency can pull a CUDA build
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m compileall -q src  # an editable install is not byte-compiled; each command would compile ~100 modules
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pneumoct synth --out $(DEMO_OUT)/phantoms --cases 4 --seed 7 --slices 80 --matrix 256
	@for c in $(DEMO_OUT)/phantoms/case_*/; do \
	  n=$$(basename $$c); \
	  $(PY) -m pneumoct diagnose $$c/dicom --out $(DEMO_OUT)/results/$$n || exit 1; \
	  $(PY) -c "import json,sys; print('    phantom ground truth:', json.load(open(sys.argv[1]))['label'])" $$c/truth.json; \
	done
	@echo "Demo done. Open the reports: $(DEMO_OUT)/results/*/report.html (synthetic phantoms, not patients)"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_diagnose.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
