"""--config FILE.yaml (recipes/config_file.py): the file's values under the command line's, checked
key by key (unknown keys name the closest flag, wrong types the line and what the flag takes), and
the merged flags in config.json."""
import json

import pytest

import train
from recipes.config_file import parse_args
from recipes.flags import build_parser


def _parse(tmp_path, text: str, *argv):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    return parse_args(build_parser(), ["--config", str(f), *argv])


def test_values_are_read_typed_and_the_command_line_overrides_them(tmp_path):
    args = _parse(tmp_path, "stage: grpo\nmax-new-tokens: 256\nlr: 1e-6\nbeta: 0\nreward: [accuracy, format]\n"
                            "dynamic_sampling: true\ntemperature: null\n", "--max-new-tokens", "64")
    assert args.stage == "grpo" and args.max_new_tokens == 64              # the command line wins
    assert args.lr == 1e-6 and isinstance(args.beta, float) and args.beta == 0.0
    assert args.reward == "accuracy,format" and args.dynamic_sampling is True
    assert args.temperature == build_parser().parse_args([]).temperature  # null: the flag's default
    assert parse_args(build_parser(), ["--lr", "0.5"]).lr == 0.5           # no file: the parser alone


def test_bad_keys_and_values_name_the_file_line_key_and_what_was_expected(tmp_path):
    f = str(tmp_path / "run.yaml")
    cases = [
        ("stage: grpo\nmax_new_token: 5\n", rf"{f}, line 2: unknown key 'max_new_token'.*closest flag is --max-new-tokens"),
        ("stage: grpo\n\ngroup_size: 4.5\n", rf"{f}, line 3: group_size: expected an integer, got 4.5"),
        ("lr: fast\n", rf"{f}, line 1: lr: expected a number, got 'fast'"),
        ("dynamic-sampling: yes please\n", r"line 1: dynamic-sampling: expected true or false"),
        ("stage: train\n", r"line 1: stage: 'train' is not one of pretrain, sft, grpo"),
        ("reward: {accuracy: 1}\n", r"line 1: reward: expected a string, got"),
        ("- stage\n- grpo\n", r"expected a mapping of flag names to values, got a list"),
        ("stage: [grpo\n", r"not YAML"),
    ]
    for text, match in cases:
        with pytest.raises(ValueError, match=match):
            _parse(tmp_path, text)
    with pytest.raises(ValueError, match="--config .*nope.yaml: no such file"):
        parse_args(build_parser(), ["--config", str(tmp_path / "nope.yaml")])


def test_train_py_writes_the_merged_flags_and_refuses_a_bad_file(tmp_path, capsys):
    f = tmp_path / "sft.yaml"
    f.write_text("stage: sft\npreset: tiny\nmax_steps: 7\nlr: 3.0e-4\n")
    out = tmp_path / "run"
    assert train.main(["--config", str(f), "--lr", "1e-3", "--out", str(out), "--dry-run"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"] == str(f) and config["max_steps"] == 7 and config["lr"] == 1e-3 and config["preset"] == "tiny"
    f.write_text("stage: sft\nmax_stepz: 7\n")
    assert train.main(["--config", str(f), "--out", str(tmp_path / "bad"), "--dry-run"]) == 2
    assert "unknown key 'max_stepz'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
