# The two commands of the README: `make run` (the worker on test_input.json) and `make test`.
PY := .venv/bin/python
export YOLO_CONFIG_DIR ?= $(CURDIR)/.venv/ultralytics-config

.PHONY: setup run run-splat test lint bench
setup:
	./scripts/setup.sh

run: setup
	$(PY) handlers/infer.py

# The splat worker on examples/splat/test_input.json (the SDK reads test_input.json from the
# working directory): a synthetic orbit video -> SfM -> a short CPU training run.
run-splat: setup
	cd examples/splat && ../../$(PY) ../../handlers/splat.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: setup
	$(PY) bench/bench_infer.py
