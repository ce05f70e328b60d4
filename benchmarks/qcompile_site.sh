#!/usr/bin/env bash
# Copy qcompile from this checkout into the site folder $1 as it installs: pyproject maps `passes/` and `backends/`
# to qcompile.passes and qcompile.backends, so the source folder on PYTHONPATH would not import. For the GPU
# session scripts, on a machine without qcompile installed; run them with `python3 -P` to keep the checkout off
# sys.path.
set -e
mkdir -p "$1"
cp -r qcompile "$1"/
cp -r passes "$1"/qcompile/passes
cp -r backends "$1"/qcompile/backends
