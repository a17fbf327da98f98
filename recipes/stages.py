"""The stage runner: one stage of the recipe (pretrain, sft, grpo, generate, eval, serve, compare,
pass-rate) from its flags.

    from recipes.stages import check_stage, run_stage
    check_stage(args, info)          # defaults that fit the run, then the stage's own flag checks
    run = prepare_run_dir(args.out)  # (the caller decides where the run directory goes)
    run_stage(args, run, info)       # the stage's loop; returns its exit status

train.py runs one stage this way from the command line, and recipes run each of their stages the
same way from settings (recipes.flags.stage_args), so a stage inside a recipe gets the same
defaults and the same checks as one started by hand. It lives below train.py, beside the recipes,
so that recipes never import train.py.

Each stage's own module does the work and owns its flag checks (ValueError naming the flag, run
before the run directory is touched); the imports are lazy so that `train.py --help` and a bad
flag stay fast.
"""
from __future__ import annotations

from typing import Callable

from recipes.flags import STAGES
from runtime.distributed import DistInfo, print0
from runtime.host_memory import keep_freed_host_memory
from runtime.rundir import prepare_run_dir, write_run_config


def _sft(args, run, info):
    from sft.loop import train_sft
    return train_sft(args, run, info)


def _grpo(args, run, info):
    from rl.loop import train_grpo
    return train_grpo(args, run, info)


def _generate(args, run, info):
    from evaluation.generate_stage import run_generate
    return run_generate(args, run, info)


def _eval(args, run, info):
    from evaluation.eval_stage import run_eval
    return run_eval(args, run, info)


def _serve(args, run, info):
    from serve.server import run_serve
    return run_serve(args, run, info)


def _compare(args, run, info):
    from evaluation.compare_stage import run_compare
    return run_compare(args, run, info)


def _check_compare(args, info):
    from evaluation.compare_stage import check_flags
    return check_flags(args, info.world_size)


def _pass_rate(args, run, info):
    from evaluation.pass_rate_stage import run_pass_rate
    return run_pass_rate(args, run, info)


def _check_pass_rate(args, info):
    from evaluation.pass_rate_stage import check_flags
    return check_flags(args, info.world_size)


def _check_sft(args, info):
    from sft.loop import check_flags
    return check_flags(args, info.world_size)


def _check_grpo(args, info):
    from rl.loop import check_flags
    return check_flags(args, info.world_size)


def _check_generate(args, info):
    from evaluation.generate_stage import check_flags
    return check_flags(args, info.world_size)


def _check_eval(args, info):
    from evaluation.eval_stage import check_flags
    return check_flags(args, info.world_size)


def _check_serve(args, info):
    from serve.server import check_flags
    return check_flags(args, info.world_size)


# name -> function(args, run_dir, dist_info) returning an exit status; a name absent here is not built yet
RUNNERS: dict[str, Callable] = {"pretrain": _sft, "sft": _sft, "grpo": _grpo, "generate": _generate, "eval": _eval,
                               "serve": _serve, "compare": _compare, "pass-rate": _pass_rate}
# name -> function(args, dist_info) raising ValueError on bad flags; it fills the unset run-dependent
# flags (recipes/flags.py lists them) and returns the console lines of the values it chose
CHECKS: dict[str, Callable] = {"pretrain": _check_sft, "sft": _check_sft, "grpo": _check_grpo,
                               "generate": _check_generate, "eval": _check_eval, "serve": _check_serve,
                               "compare": _check_compare, "pass-rate": _check_pass_rate}
assert set(RUNNERS) <= set(STAGES) and set(CHECKS) <= set(STAGES)


def check_stage(args, info: DistInfo, log=print0) -> None:
    """Check the flags of `args.stage` (ValueError naming the flag), filling its unset run-dependent
    flags with values that fit the run; each value chosen is logged. Touches nothing on disk."""
    if args.stage not in STAGES:
        raise ValueError(f"stage {args.stage!r}: expected one of {', '.join(STAGES)}")
    check = CHECKS.get(args.stage)
    for line in (check(args, info) if check else None) or ():
        log(line)


def run_stage(args, run, info: DistInfo) -> int:
    """Run `args.stage` (checked by check_stage) in the prepared run directory `run`."""
    if args.stage not in RUNNERS:
        raise ValueError(f"stage {args.stage!r} is not built yet (built: {', '.join(sorted(RUNNERS))})")
    keep_freed_host_memory()  # activations are not faulted in afresh every step (runtime/host_memory.py)
    return RUNNERS[args.stage](args, run, info) or 0


def run_recipe_stage(name: str, args, root, info: DistInfo, log=print0):
    """One stage of a recipe, in root/name: its flags checked (check_stage), its run directory
    prepared and its flags written, the stage run. Returns (the run directory's path, the Hugging
    Face folder of its last checkpoint)."""
    from runtime.checkpoint import latest_checkpoint

    check_stage(args, info, log)
    sub = prepare_run_dir(root / name, log=log)
    write_run_config(sub, vars(args))
    log(f"== {name} ({args.stage}) ==")
    run_stage(args, sub, info)
    ckpt = latest_checkpoint(sub.path)
    if ckpt is None:
        raise RuntimeError(f"{sub.path}: the stage finished without a checkpoint")
    return sub.path, ckpt / "hf"
