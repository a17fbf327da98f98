"""Recipe files: `train.py --config FILE.yaml`, a mapping of train.py's flags to their values.

    # recipes/r1-zero-7b.yaml
    stage: grpo
    model: Qwen2.5-Math-7B
    reward: [accuracy]          # a list is the comma-separated value
    lr: 1.0e-6
    activation_checkpointing: true

    torchrun --nproc_per_node 8 train.py --config recipes/r1-zero-7b.yaml --max-steps 50

Keys are the long flags' names, with dashes or underscores (`max-new-tokens` or `max_new_tokens`).
Flags given on the command line override the file's values; what the run used is written to
config.json, as for any run (its `config` entry names the file). Checked before anything runs:

- a key that is no flag is an error naming the file, the line, the key and the closest flag;
- a value of the wrong type names the file, the line, the key and what the flag takes: on/off
  flags take true or false, integer flags an integer, float flags a number (`1e-6` is a string in
  YAML 1.1; write `1.0e-6`, or it is read as the number it spells), string flags a string, a number
  or a list of scalars (joined with commas, the form --reward and --eval-sets take);
- a value outside a flag's choices names them; `null` leaves a flag at its default.
"""
from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args(argv), with the values of `--config FILE` (when given) as the defaults the
    command line overrides. ValueError for a file that cannot be used (module docstring)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(argv)


def load_config(path, parser: argparse.ArgumentParser) -> dict:
    """{flag dest: value} of the YAML file `path`, each value checked against its flag."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got a {type(data).__name__}")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in root.value}
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    flags = {"--" + dest.replace("_", "-"): dest for dest in actions}
    out = {}
    for key, value in data.items():
        where = f"{path}, line {lines.get(str(key), '?')}"
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches("--" + dest.replace("_", "-"), list(flags), n=1, cutoff=0.6)
            hint = f"; the closest flag is {close[0]}" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}: no train.py flag --{dest.replace('_', '-')}{hint}")
        out[dest] = _checked(value, actions[dest], f"{where}: {key}")
    return out


def _checked(value, action: argparse.Action, where: str):
    """value as the flag of `action` takes it, or ValueError naming `where` and the type expected."""
    if value is None:
        return action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):   # YAML 1.1 reads 1e-6 as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif kind in (None, str):
        if isinstance(value, list):
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{where}: expected a string or a list of strings, got {value!r}")
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        value = str(value)
    else:
        try:
            value = kind(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value
