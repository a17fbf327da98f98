"""The command line of the R1 recipe.

    torchrun --nproc_per_node N train.py                       # the default recipe, r1-tiny
    torchrun --nproc_per_node N train.py --stage grpo ...      # one stage with its own flags
    python train.py --stage sft ...                            # a single process works too

Every run writes one directory (--out, default runs/<recipe or stage>): config.json (all flags as
parsed), metrics.jsonl, summary.json and checkpoints/. An existing directory is never overwritten:
--resume continues it, otherwise it is moved aside with a timestamp suffix and the console says so.

This file only parses and dispatches: the flags are recipes/flags.py's, a stage runs through
recipes/stages.py (the runner the recipes use for each of their stages too), a recipe through its
module in recipes/. A stage or recipe that is not built exits with status 2 and a message naming
it, before it creates or moves anything; so does a bad flag.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from recipes import stages
from recipes.config_file import parse_args
from recipes.flags import RECIPES, build_parser
from runtime.distributed import init_distributed, print0, teardown
from runtime.rundir import prepare_run_dir, write_run_config
from runtime.seeding import seed_everything


def _r1_tiny(args, run, info):
    from recipes.r1_tiny import run_r1_tiny
    return run_r1_tiny(args, run, info)


def _tool_tiny(args, run, info):
    from recipes.tool_tiny import run_tool_tiny
    return run_tool_tiny(args, run, info)


def _opd_tiny(args, run, info):
    from recipes.opd_tiny import run_opd_tiny
    return run_opd_tiny(args, run, info)


# recipe name -> function(args, run_dir, dist_info); a name absent here is not built yet. Stages are
# run by recipes.stages (stages.RUNNERS), the same runner the recipes use for each of their stages.
RECIPE_RUNNERS: dict[str, Callable] = {"r1-tiny": _r1_tiny, "tool-tiny": _tool_tiny, "opd-tiny": _opd_tiny}
assert set(RECIPE_RUNNERS) <= set(RECIPES)


def job_name(args: argparse.Namespace) -> str:
    return args.stage if args.stage is not None else args.recipe


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(build_parser(), argv)   # --config FILE.yaml under the command line's flags
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if args.seed < 0:
        print(f"train.py: --seed {args.seed}: expected a non-negative integer", file=sys.stderr)
        return 2
    name = job_name(args)
    kind = "stage" if args.stage is not None else "recipe"
    built = stages.RUNNERS if args.stage is not None else RECIPE_RUNNERS
    if name not in built and not args.dry_run:
        names = ", ".join(sorted(built)) or "none yet"
        print(f"train.py: {kind} '{name}' is not built yet (built {kind}s: {names}); nothing was run or written.",
              file=sys.stderr)
        return 2
    if args.out is None:
        args.out = f"runs/{name}"

    info = init_distributed(timeout_s=args.dist_timeout_s)
    try:
        try:
            if args.stage is not None and not args.dry_run:
                stages.check_stage(args, info)
            run = prepare_run_dir(args.out, resume=args.resume, log=print0)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 2
        config = {**vars(args), "world_size": info.world_size, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = write_run_config(run, config)
        print0(f"{kind} {name}: run directory {run.path} ({'resumed' if run.resumed else 'new'}), "
               f"flags in {path}")
        if args.dry_run:
            return 0
        seed_everything(args.seed)
        if args.stage is not None:
            return stages.run_stage(args, run, info)
        return RECIPE_RUNNERS[name](args, run, info) or 0
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
