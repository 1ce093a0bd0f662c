# The two commands of the README, and a few helpers. Each target creates .venv when missing.
PY := .venv/bin/python
# The image every Kubeflow component names (components/__init__.py: IMAGE)
IMAGE ?= meg:0.1.0

.PHONY: venv demo test test-fast data image image-cuda

venv:
	@./scripts/venv.sh

# The main job on the embedded default: SmolLM2-135M, CounterFact, CPU, local MLflow.
demo: venv
	$(PY) -m meg.cli demo

# The whole test suite (unit tests on tiny random models + integration tests on SmolLM2).
test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not integration"

# One tier at a time (tests/conftest.py): unit, component, pipeline, slow.
test-%: venv
	$(PY) -m pytest -q -m $*

# Restore the raw fact sets tracked by data.dvc from the copies shipped in the package.
data: venv
	$(PY) -m meg.cli data restore

# The container image of the pipeline steps (needs a Docker engine).
image:
	docker build -t $(IMAGE) .

image-cuda:
	docker build --build-arg TORCH_VARIANT=cuda -t $(IMAGE)-cuda .
