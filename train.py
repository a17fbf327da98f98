"""The command line of the R1 recipe.

    torchrun --nproc_per_node N train.py                       # the default recipe, r1-tiny
    torchrun --nproc_per_node N train.py --stage grpo ...      # one stage with its own flags
    python train.py --stage sft ...                            # a single process works too

Every run writes one directory (--out, default runs/<recipe or stage>): config.json (all flags as
parsed), metrics.jsonl, summary.json and checkpoints/. An existing directory is never overwritten:
--resume continues it, otherwise it is moved aside with a timestamp suffix and the console says so.

Stages land one at a time; a stage or recipe that is not built yet exits with status 2 and a message
naming it, before it creates or moves anything.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from runtime.distributed import init_distributed, print0, teardown
from runtime.rundir import prepare_run_dir, write_run_config
from runtime.seeding import seed_everything

STAGES = ("pretrain", "sft", "grpo", "generate", "eval")
RECIPES = ("r1-tiny",)

# name -> function(args, run_dir, dist_info) that runs it; a name absent here is not built yet.
BUILT: dict[str, Callable] = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="The DeepSeek-R1 recipe: pretrain, SFT, GRPO, rejection-sampling "
        "generation and evaluation, one stage at a time or as a whole recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    # what to run
    g = p.add_argument_group("what to run")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="run one stage; without it the --recipe runs")
    g.add_argument("--recipe", choices=RECIPES, default="r1-tiny",
                   help="a named chain of stages (used when --stage is not given)")

    # run directory
    g = p.add_argument_group("run directory")
    g.add_argument("--out", default=None, help="run directory (default: runs/<recipe or stage>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint instead of starting anew")
    g.add_argument("--dry-run", action="store_true",
                   help="prepare the run directory, write config.json, print the flags and exit")

    # reproducibility
    g = p.add_argument_group("reproducibility")
    g.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")
    return p


def job_name(args: argparse.Namespace) -> str:
    return args.stage if args.stage is not None else args.recipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed < 0:
        print(f"train.py: --seed {args.seed}: expected a non-negative integer", file=sys.stderr)
        return 2
    name = job_name(args)
    kind = "stage" if args.stage is not None else "recipe"
    if name not in BUILT and not args.dry_run:
        built = ", ".join(sorted(BUILT)) or "none yet"
        print(f"train.py: {kind} '{name}' is not built yet (built: {built}); nothing was run or written.",
              file=sys.stderr)
        return 2
    if args.out is None:
        args.out = f"runs/{name}"

    info = init_distributed()
    try:
        try:
            run = prepare_run_dir(args.out, resume=args.resume, log=print0)
        except (FileNotFoundError, NotADirectoryError) as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 2
        config = {**vars(args), "world_size": info.world_size, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = write_run_config(run, config)
        print0(f"{kind} {name}: run directory {run.path} ({'resumed' if run.resumed else 'new'}), "
               f"flags in {path}")
        if args.dry_run:
            return 0
        seed_everything(args.seed)
        return BUILT[name](args, run, info) or 0
    finally:
        teardown()

if __name__ == "__main__":
    sys.exit(main())
