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
	@DEMO_OUT=$(DEMO) scripts/demo.sh

clean:
	rm -rf $(DEMO) .pytest_cache
