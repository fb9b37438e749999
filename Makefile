# The two commands of the README: `make run` (the worker on test_input.json) and `make test`.
PY := .venv/bin/python
export YOLO_CONFIG_DIR ?= $(CURDIR)/.venv/ultralytics-config

.PHONY: setup run run-splat serve test lint bench images
setup:
	./scripts/setup.sh

run: setup
	$(PY) handlers/infer.py

# The splat worker on examples/splat/test_input.json (the SDK reads test_input.json from the
# working directory): a synthetic orbit video -> SfM -> a short CPU training run.
run-splat: setup
	cd examples/splat && ../../$(PY) ../../handlers/splat.py

# The local endpoint server (RunPod's API) for the infer worker; HANDLER=handlers.splat for the other.
HANDLER ?= handlers.infer
serve: setup
	$(PY) -m core.serve $(HANDLER) --port 8000

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy

bench: setup
	$(PY) bench/bench_infer.py
	$(PY) bench/bench_tasks.py

# Both Docker images built and run with buildah (root; about 11 minutes on 2 cores).
images: setup
	scripts/build_images.sh --touch-rebuild
