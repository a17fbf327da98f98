#!/usr/bin/env bash
# The one prepared check for a GPU machine (kernel accuracy and speed, SFT and GRPO steps of a 0.5B
# model through train.py, sampler decode speed); see bench/gpu_check.py for the sections, budgets
# and the JSON it writes.
#
#   bash bench/gpu_check.sh [--out FILE] [--dry-run] [--only NAME[,NAME...]] [--keep-work]
#
# Runs from the repository root with it on PYTHONPATH and TRITON_INTERPRET unset (the check times
# real kernels). A relative --out is taken from the directory you called this from; $PYTHON
# (default: python) is the interpreter.
set -euo pipefail
export GPU_CHECK_CALLER_CWD="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
