"""Model statistics from a ModelConfig alone (no weights needed: works for a 671B config).

    from model.stats import count_params, flops_per_token     # model/counts.py
    python -m model.stats plan --model DIR --stage grpo ...   # the memory planner, model/memory_plan.py

This module is the command line and the one import path for both.
"""
from __future__ import annotations

import sys

from model.counts import (ParamCount, attention_params, block_params, count_params, ffn_params,  # noqa: F401
                          flops_per_token)
from model.memory_plan import MemoryPlan, PlanSettings, plan_memory  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """`python -m model.stats plan ...`: the memory planner's command line (model.memory_plan.main)."""
    from model.memory_plan import main as plan_main

    return plan_main(argv)


if __name__ == "__main__":
    sys.exit(main())
