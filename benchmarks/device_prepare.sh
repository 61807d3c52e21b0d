#!/bin/bash
# What benchmarks/device_run.sh needs beside the working tree, made here (online) before
# the one device call: the wheels the offline machine installs (.whl/: MPICH, mpi4py, the
# pytest plugins, and setuptools, which a Python 3.12 venv lacks and the extensions'
# build needs) and the issue's baseline tree for the A/Bs (.oldtree/, 3a2e1e0 as plain
# files). Both are git-ignored; the device tool's `carry` takes them (about 16 MiB):
#
#   bash benchmarks/device_prepare.sh
#   run(command="bash benchmarks/device_run.sh $OUT", carry=[".whl", ".oldtree"], timeout_s=590)
set -eu
cd "$(dirname "$0")/.."
rm -rf .whl .oldtree
mkdir -p .whl .oldtree
# The device's image runs Python 3.12 (KINDS.md): wheels for it, not for this machine.
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    -d .whl mpich mpi4py pytest-mpi pytest-timeout setuptools
git archive "${OLDTREE:-3a2e1e0}" | tar -x -C .oldtree
du -sh .whl .oldtree
