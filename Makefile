# The two commands of the README, and a few helpers. Each target creates .venv when missing.
PY := .venv/bin/python

.PHONY: venv demo test test-fast data

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

# Restore the raw fact sets tracked by data.dvc from the copies shipped in the package.
data: venv
	$(PY) -m meg.cli data restore
