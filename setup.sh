#!/usr/bin/env bash
# Set up mammo-dissect in a virtual environment (default: .venv; override with VENV=path).
#
# torch and torchvision are installed first as a matching pair (2.14.1 and
# 0.29.1), because timm and open_clip need a torchvision that imports beside
# the installed torch.  Then the project and its test dependencies.
set -euo pipefail

cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
"$VENV/bin/mammo-dissect" --version
echo "mammo-dissect is installed in $VENV; activate it with: source $VENV/bin/activate"
