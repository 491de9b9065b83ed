#!/usr/bin/env bash
# Build the test environments from scratch and run the whole suite (the README's test command).
#
#   .venv        fedplug-core, the numpy/torch/keras/jax/mlx backends and the test plugins (tests/plugins: backends,
#                broken plugins, and fedplug-scaffold, a third-party strategy whose tests the suite runs)
#   .venv-mxnet  fedplug-core and fedplug-mxnet only: MXNet 1.9.1 needs numpy<2
#
# Both are built before any test runs: the mixed-framework deployment test
# (fedplug-core/tests/test_mixed_deployment.py) runs from .venv and starts a SuperNode from .venv-mxnet,
# found through FEDPLUG_MXNET_VENV.
#
# Each distribution's tests are in its own tests/ folder (pyproject.toml's testpaths); they run on
# two pytest-xdist workers, a whole file per worker. Distributions are installed as built wheels
# (not editable), as users get them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
PIP_FLAGS=(--quiet --disable-pip-version-check)

echo "== test environment .venv"
"$PYTHON" -m venv --clear .venv
# the CPU build of PyTorch first: a bare `torch` requirement would pull CUDA wheels
.venv/bin/pip install "${PIP_FLAGS[@]}" torch==2.13.0
.venv/bin/pip install "${PIP_FLAGS[@]}" \
  "./fedplug-core[tensorboard,mlflow,dp]" tensorboard ./fedplug-torch "./fedplug-keras[tensorflow-cpu]" ./fedplug-jax ./fedplug-mlx \
  ./tests/plugins/fedplug-testplugins ./tests/plugins/fedplug-broken-example ./tests/plugins/fedplug-faulty \
  ./tests/plugins/fedplug-legacy-example ./tests/plugins/fedplug-scaffold \
  pytest pytest-xdist pytest-timeout psutil ruff import-linter sybil pyyaml

echo "== test environment .venv-mxnet"
"$PYTHON" -m venv --clear .venv-mxnet
.venv-mxnet/bin/pip install "${PIP_FLAGS[@]}" ./fedplug-core ./fedplug-mxnet pytest pytest-timeout psutil
export FEDPLUG_MXNET_VENV="$PWD/.venv-mxnet"

echo "== tests in .venv"
.venv/bin/ruff check . && .venv/bin/ruff format --check .
# the core's layers (root pyproject.toml [tool.importlinter]), on the installed fedplug
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -n 2 --dist loadfile --durations=25 "$@"

echo "== tests in .venv-mxnet"
.venv-mxnet/bin/python -m pytest fedplug-mxnet/tests --durations=10 "$@"

echo "== strict mypy (configured in pyproject.toml)"
.venv/bin/pip install "${PIP_FLAGS[@]}" mypy
.venv/bin/mypy
