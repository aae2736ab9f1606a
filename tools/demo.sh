#!/usr/bin/env bash
# Set up (if needed), make sample layers, merge them into a hardlink farm and print the
# merged tree with the layer each path came from.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
exec .venv/bin/python tools/demo.py "$@"
