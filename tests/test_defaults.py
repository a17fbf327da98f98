"""Defaults never reject a valid run: every flag left unset gets a value that fits the run it is in
(the number of ranks, --max-steps, the data), the console and config.json say which, and a value
given on the command line is still used as given and checked.

The audit (recipes/flags.py lists the rules): --warmup-steps, --batch-size, --prompts-per-step,
--keep-if and --eval-task had fixed defaults that a short run, a rank count that does not divide
them, a small data set or a reward other than accuracy/format rejected (or, for --eval-task,
silently checked MATH answers as arithmetic).
"""
import json
from argparse import Namespace

import pytest
import torch

import train
from data.datasets import fit_global_batch
from evaluation.evaluate import infer_task
from recipes.flags import build_parser
from tests.rl._grpo_worker import grpo_argv, make_model_dir, write_prompts


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sft_assets(tmp_path_factory):
    from data.tasks import arithmetic_problems, pretraining_corpus, write_jsonl
    from data.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("defaults")
    rows = pretraining_corpus("arithmetic", 40, seed=1, carry_bug=0.0, wrong_answer=0.0, missing_tags=0.0, digits=2)
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], d / "sft.jsonl")
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows[:10]], d / "small.jsonl")
    write_jsonl(arithmetic_problems(4, seed=0, digits=2, split="test"), d / "heldout.jsonl")
    Tokenizer.train([r["text"] for r in rows], vocab_size=320).save(d / "tok")
    return d


def _sft(d, out, data="sft.jsonl", *extra):
    """A short SFT run with no --warmup-steps and no --batch-size."""
    return ["--stage", "sft", "--preset", "tiny", "--tokenizer", str(d / "tok"), "--chat-template", "r1-zero",
            "--data", str(d / data), "--out", str(out), "--max-steps", "6", "--micro-batch-size", "4",
            "--seq-len", "256", "--log-every-s", "60", *map(str, extra)]


def _config(run) -> dict:
    return json.loads((run / "config.json").read_text())


def test_a_short_sft_run_with_no_warmup_flag_runs_and_says_what_it_used(sft_assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(_sft(sft_assets, run)) == 0
    out = capsys.readouterr().out
    assert "--warmup-steps 0 (default: a tenth of --max-steps 6, at most 10)" in out
    assert "--batch-size 32 (default: 32)" in out
    config = _config(run)
    assert config["warmup_steps"] == 0 and config["batch_size"] == 32
    assert {"warmup_steps", "batch_size"} <= set(config["defaulted"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6


def test_given_values_are_still_checked(sft_assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(_sft(sft_assets, run, "sft.jsonl", "--warmup-steps", "10")) == 2
    assert "--warmup-steps 10: expected between 0 and --max-steps (6)" in capsys.readouterr().err
    assert not run.exists()


def test_a_default_batch_shrinks_to_a_small_data_set_but_a_given_one_does_not(sft_assets, tmp_path, capsys):
    run = tmp_path / "small"
    assert train.main(_sft(sft_assets, run, "small.jsonl", "--max-steps", "2")) == 0
    out = capsys.readouterr().out
    assert "--batch-size 10 (default 32 is more than" in out and "has 10 documents that fit" in out
    assert _config(run)["batch_size"] == 10          # config.json says what ran
    with pytest.raises(ValueError, match=r"--batch-size 32: .*small.jsonl has 10 documents that fit, fewer than "
                                         r"one step's worth; give --batch-size 10 or less"):
        train.main(_sft(sft_assets, tmp_path / "given", "small.jsonl", "--batch-size", "32"))


def test_warmup_default_is_a_tenth_of_the_run_at_most_ten():
    from runtime.optim import check_training_flags

    for max_steps, warmup in [(0, 0), (6, 0), (10, 1), (55, 5), (100, 10), (5000, 10)]:
        args = build_parser().parse_args(["--stage", "sft", "--max-steps", str(max_steps)])
        check_training_flags(args)
        assert args.warmup_steps == warmup, max_steps


@pytest.mark.parametrize("world_size, batch, prompts", [(1, 32, 16), (2, 32, 16), (3, 33, 18), (6, 36, 18),
                                                        (64, 64, 64)])
def test_defaults_fit_any_number_of_ranks(sft_assets, tmp_path, world_size, batch, prompts):
    from rl.loop import check_flags as check_grpo
    from sft.loop import check_flags as check_sft

    make_model_dir(tmp_path / "model")
    write_prompts(tmp_path / "p.jsonl", 4)
    sft = build_parser().parse_args(_sft(sft_assets, tmp_path / "a"))
    notes = check_sft(sft, world_size)
    assert sft.batch_size == batch and any(n.startswith(f"--batch-size {batch} (default: 32") for n in notes)
    argv = grpo_argv(tmp_path / "model", tmp_path / "p.jsonl", tmp_path / "b")
    for flag in ("--warmup-steps", "--prompts-per-step"):
        i = argv.index(flag)
        del argv[i:i + 2]
    grpo = build_parser().parse_args(argv)
    notes = check_grpo(grpo, world_size)
    assert grpo.prompts_per_step == prompts and grpo.warmup_steps == 0
    assert any(n.startswith(f"--prompts-per-step {prompts} (default: 16") for n in notes)
    # given values that the ranks do not divide are refused, naming the flag
    with pytest.raises(ValueError, match="--batch-size 5: expected a positive multiple of the 2 rank"):
        check_sft(build_parser().parse_args(_sft(sft_assets, tmp_path / "a", "sft.jsonl", "--batch-size", "5")), 2)


def test_a_short_grpo_run_on_few_prompts_with_no_prompts_flag(tmp_path, capsys):
    make_model_dir(tmp_path / "model")
    write_prompts(tmp_path / "p.jsonl", 5)
    argv = grpo_argv(tmp_path / "model", tmp_path / "p.jsonl", tmp_path / "run", "--max-steps", 1)
    for flag in ("--warmup-steps", "--prompts-per-step"):
        i = argv.index(flag)
        del argv[i:i + 2]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "--warmup-steps 0 (default: a tenth of --max-steps 1, at most 10)" in out
    assert "--prompts-per-step 5 (default 16 is more than" in out
    config = _config(tmp_path / "run")
    assert config["prompts_per_step"] == 5 and config["warmup_steps"] == 0


def test_grpo_flags_are_checked_before_anything_is_written(tmp_path, capsys):
    make_model_dir(tmp_path / "model")
    write_prompts(tmp_path / "p.jsonl", 8)
    for extra, message in [(("--prompts-per-step", "3", "--num-minibatches", "99"), "--num-minibatches 99: expected "
                            "between 1 and the 12 sequences"), (("--group-size", "1"), "--group-size 1: expected >= 2"),
                           (("--temperature", "0"), "--temperature 0.0: expected > 0"),
                           (("--reward", "acuracy"), "unknown reward 'acuracy'")]:
        run = tmp_path / "run"
        assert train.main(grpo_argv(tmp_path / "model", tmp_path / "p.jsonl", run, *extra)) == 2
        assert message in capsys.readouterr().err, extra
        assert not run.exists()


def test_keep_if_default_follows_the_rewards(tmp_path):
    from evaluation.generate_stage import check_flags

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
    for reward, keep in [("accuracy,format", "accuracy>=1,format>=1"), ("code", "code>=1"),
                         ("accuracy,language", "accuracy>=1"), ("length,soft_overlong", "none")]:
        args = build_parser().parse_args(["--stage", "generate", "--preset", "tiny", "--tokenizer", "tok",
                                          "--data", str(data), "--reward", reward])
        notes = check_flags(args, 1)
        assert args.keep_if == keep and notes and notes[0].startswith(f"--keep-if {keep} (default:"), reward
    args = build_parser().parse_args(["--stage", "generate", "--preset", "tiny", "--tokenizer", "tok",
                                      "--data", str(data), "--reward", "code", "--keep-if", "accuracy>=1"])
    with pytest.raises(ValueError, match="names 'accuracy', which --reward does not score"):
        check_flags(args, 1)   # a given --keep-if is used as given


def test_eval_task_default_comes_from_the_rows():
    from data.tasks import arithmetic_problems

    assert infer_task(arithmetic_problems(2, seed=0)) == "arithmetic"
    assert infer_task([{"task": "countdown", "numbers": [1, 2], "target": 3}]) == "countdown"
    assert infer_task([{"problem": "What is $1+1$?", "answer": "2"}]) == "math"    # MATH-500, AIME rows
    assert infer_task([{"prompt": "def f():", "test": "def check(c): pass", "entry_point": "f"}]) == "code"
    assert infer_task([{"prompt": "Write f.", "test_list": ["assert f() == 1"]}]) == "code"   # MBPP rows
    from evaluation.evaluate import heldout_task
    assert heldout_task(Namespace(eval_task="math"), arithmetic_problems(2, seed=0)) == "math"   # given: as given


def test_fit_global_batch():
    assert fit_global_batch(32, 100, 2, flag="--batch-size", what="x") == (32, None)
    value, note = fit_global_batch(32, 21, 2, flag="--batch-size", what="x has 21 rows", defaulted=True)
    assert value == 20 and "--batch-size 20 (default 32 is more than x has 21 rows" in note
    with pytest.raises(ValueError, match="--batch-size 32: x has 21 rows, fewer than one step's worth; give "
                                         "--batch-size 20 or less"):
        fit_global_batch(32, 21, 2, flag="--batch-size", what="x has 21 rows")
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        fit_global_batch(32, 3, 4, flag="--batch-size", what="x has 3 rows", defaulted=True)


def test_training_past_the_model_length_is_refused_unless_extended(tmp_path):
    """A document (SFT) or prompt + completion (GRPO) longer than the checkpoint's
    max_position_embeddings is refused naming both numbers; --max-position-embeddings (with a rope
    override) extends the model, and the export says so."""
    from data.tasks import pretraining_corpus, write_jsonl

    make_model_dir(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    rows = pretraining_corpus("arithmetic", 40, seed=1, carry_bug=0.0, wrong_answer=0.0, missing_tags=0.0, digits=2)
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], tmp_path / "sft.jsonl")
    sft = ["--stage", "sft", "--model", str(tmp_path / "model"), "--chat-template", "r1-zero", "--data",
           str(tmp_path / "sft.jsonl"), "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4",
           "--seq-len", "256", "--log-every-s", "60"]
    with pytest.raises(ValueError, match=r"the longest document of .*sft.jsonl needs \d+ positions but the model "
                                         r"\(.*model\) has max_position_embeddings 32; to train past its length pass "
                                         r"--max-position-embeddings \d+ or more"):
        train.main([*sft, "--out", str(tmp_path / "short")])
    assert train.main([*sft, "--out", str(tmp_path / "long"), "--max-position-embeddings", "256",
                       "--rope-theta", "40000"]) == 0
    exported = json.loads((tmp_path / "long" / "checkpoints" / "step-00000001" / "hf" / "config.json").read_text())
    assert exported["max_position_embeddings"] == 256 and exported["rope_theta"] == 40000.0

    write_prompts(tmp_path / "p.jsonl", 8)
    with pytest.raises(ValueError, match=r"a prompt of \d+ tokens with --max-new-tokens 12 needs \d+ positions but the "
                                         r"model .* has max_position_embeddings 32"):
        train.main(grpo_argv(tmp_path / "model", tmp_path / "p.jsonl", tmp_path / "grpo", "--max-steps", 1))
