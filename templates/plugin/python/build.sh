#!/bin/sh
# Builds {{name}}.wasm from app.py with componentize-py. The first run
# installs componentize-py into .venv/ (Python 3.10 or newer needed); set
# COMPONENTIZE_PY to use one you already have.
set -eu
cd "$(dirname "$0")"
VERSION=0.25.1
if [ -z "${COMPONENTIZE_PY:-}" ]; then
    COMPONENTIZE_PY=.venv/bin/componentize-py
    if [ "$("$COMPONENTIZE_PY" --version 2>/dev/null)" != "componentize-py $VERSION" ]; then
        echo "build.sh: installing componentize-py $VERSION into .venv/" >&2
        python3 -m venv .venv
        .venv/bin/pip install --quiet "componentize-py==$VERSION"
    fi
fi
"$COMPONENTIZE_PY" --wit-path wit --world plugin componentize app --output {{name}}.wasm
echo "build.sh: wrote {{name}}.wasm" >&2
