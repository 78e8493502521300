# The two commands a user needs: `make demo` and `make test`. Both run `make setup` first.
SHELL := /bin/bash
PY := .venv/bin/python
DEMO := demo-out

.PHONY: setup test test-all bench demo clean

setup:
	@scripts/setup.sh

# Default suite, real-server integration tests included. Pytest's exit code 5 (no tests collected) is not a failure.
test: setup
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

bench: setup
	$(PY) -m pytest -m bench tests/bench -s

demo: setup
	.venv/bin/segnode phantom $(DEMO)/phantom
	.venv/bin/segnode volume-info $(DEMO)/phantom/dicom
	.venv/bin/segnode convert $(DEMO)/phantom/dicom $(DEMO)/phantom-ct.nii.gz
	@echo "demo: outputs in $(DEMO)/"

clean:
	rm -rf $(DEMO) .pytest_cache
