"""Data sets: JSONL/Parquet readers for RL prompts, SFT conversations and eval sets, and the
deterministic, sharded, resumable batch order that feeds the training loops.

Row shapes this module hands out (every other column of the file is kept as it is):

    load_prompts        {"prompt": str} and/or {"messages": [{role, content}, ...]}, + columns
                        (the GRPO loop passes the columns to reward functions as keyword arguments,
                        TRL-style: answer=[...], tests=[...], ...)
    load_conversations  {"messages": [{role, content[, reasoning_content]}, ...]}, + columns
    load_eval_set       {"id": str, "problem": str, "kind": "math" | "code" | a task name,
                         "answer": str (not code) | "test": str (code)}, + the source's columns

Errors in a user's file are ValueErrors that name the place: `file:line` for JSONL (1-based line
numbers, blank lines counted), `file row N` for Parquet (1-based row number), then the column and
what was expected.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROLES = ("system", "user", "assistant", "tool")   # tool: a tool's output in a tool-using trace (never trained)

# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------


def _check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a file (expected a .jsonl or .parquet file)")
    return path


def _iter_jsonl_located(path: Path) -> Iterator[tuple[str, dict]]:
    # Bytes are decoded line by line so that bad UTF-8, like bad JSON, is reported with its line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e})") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            yield where, row


def _iter_parquet_located(path: Path) -> Iterator[tuple[str, dict]]:
    # pyarrow is optional: only Parquet users need it, so it is imported here and not at the top.
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading Parquet files needs pyarrow (pip install pyarrow)") from e
    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path} row {i}", row


def _iter_located(path) -> Iterator[tuple[str, dict]]:
    """(place, row) pairs of a JSONL or (suffix .parquet) Parquet file; place names file and line."""
    path = _check_file(path)
    if path.suffix == ".parquet":
        return _iter_parquet_located(path)
    return _iter_jsonl_located(path)


def iter_jsonl(path) -> Iterator[dict]:
    """Stream the objects of a JSONL file one line at a time (for files too large to hold).

    Blank lines are skipped. A line that is not valid JSON, or not a JSON object, raises ValueError
    naming `file:line` and the decoder's message. A missing file raises FileNotFoundError at once.
    """
    located = _iter_jsonl_located(_check_file(path))
    return (row for _, row in located)


def read_jsonl(path) -> list[dict]:
    """All objects of a JSONL file, in file order (see `iter_jsonl` for the rules)."""
    return list(iter_jsonl(path))


def read_rows(path) -> list[dict]:
    """All rows of a data file: Parquet when the suffix is `.parquet` (needs pyarrow), else JSONL."""
    return [row for _, row in _iter_located(path)]


def _require_rows(rows: list, path) -> None:
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def _check_messages(messages, where: str, column: str = "messages") -> None:
    """A non-empty list of {role in ROLES, content: str}; `reasoning_content` only on assistants.

    Other keys of a message (name, tool_calls, ...) are left alone for the chat template.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: column '{column}' must be a non-empty list of "
                         f"{{role, content}} objects, got {_describe(messages)}")
    for j, m in enumerate(messages):
        at = f"{where}: {column}[{j}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at} must be an object with 'role' and 'content', got {_describe(m)}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{at}: unknown role {m.get('role')!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{at}: 'content' must be a string, got {_describe(m.get('content'))}")
        if "reasoning_content" in m:
            if m["role"] != "assistant":
                raise ValueError(f"{at}: 'reasoning_content' is only allowed on assistant messages, "
                                 f"found on role {m['role']!r}")
            if not isinstance(m["reasoning_content"], str):
                raise ValueError(f"{at}: 'reasoning_content' must be a string, "
                                 f"got {_describe(m['reasoning_content'])}")


def _describe(x) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# ---------------------------------------------------------------------------------------------
# RL prompts
# ---------------------------------------------------------------------------------------------


def load_prompts(path, prompt_column: str = "prompt") -> list[dict]:
    """RL prompts: one row per problem, in file order.

    Each row needs `prompt_column` (a non-empty string) or `messages` (a chat, see `ROLES`); with
    both, both are checked and kept. When `prompt_column` is not "prompt", its text is also stored
    under "prompt" (the name the RL loop reads), and the original column stays. Every other column
    (answer, tests, kind, numbers, target, ...) passes through untouched: they become the reward
    functions' keyword arguments.
    """
    rows = []
    for where, row in _iter_located(path):
        has_prompt, has_messages = prompt_column in row, "messages" in row
        if not has_prompt and not has_messages:
            raise ValueError(f"{where}: missing column '{prompt_column}' (or 'messages'); "
                             f"the row has columns {sorted(row)}")
        if has_prompt:
            text = row[prompt_column]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: column '{prompt_column}' must be a non-empty string, "
                                 f"got {_describe(text)}")
        if has_messages:
            _check_messages(row["messages"], where)
        if has_prompt and prompt_column != "prompt":
            if "prompt" in row and row["prompt"] != row[prompt_column]:
                raise ValueError(f"{where}: prompt_column is '{prompt_column}' but the row also has a "
                                 f"different 'prompt' column; rename one of them")
            row = {**row, "prompt": row[prompt_column]}
        rows.append(row)
    _require_rows(rows, path)
    return rows


# ---------------------------------------------------------------------------------------------
# SFT conversations
# ---------------------------------------------------------------------------------------------


def _as_messages(value, role: str, where: str, column: str) -> list[dict]:
    # TRL's two prompt-completion styles: plain strings, or lists of messages ("conversational").
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        _check_messages(value, where, column)
        return [dict(m) for m in value]
    raise ValueError(f"{where}: column '{column}' must be a string or a list of messages, "
                     f"got {_describe(value)}")


def load_conversations(path) -> list[dict]:
    """SFT conversations: rows with `messages`, in file order.

    Accepted shapes, per row:
      - `messages`: [{role: system|user|assistant, content: str[, reasoning_content: str]}, ...]
      - `prompt` + `completion` (TRL's prompt-completion form): strings become one user and one
        assistant message; lists of messages are concatenated. The two columns are replaced by
        `messages`, so the conversation has one home.
      - either of the above plus a top-level `reasoning` string: it is moved onto the last
        assistant message as `reasoning_content` (the field DeepSeek-R1's template renders inside
        <think>...</think>).
    Every conversation needs at least one assistant message (the SFT loss is taken on those).
    Other columns are kept.
    """
    rows = []
    for where, row in _iter_located(path):
        row = dict(row)
        if "messages" in row:
            if "prompt" in row or "completion" in row:
                raise ValueError(f"{where}: the row has both 'messages' and 'prompt'/'completion'; "
                                 f"keep one form")
            _check_messages(row["messages"], where)
            messages = [dict(m) for m in row["messages"]]
        elif "prompt" in row and "completion" in row:
            messages = (_as_messages(row.pop("prompt"), "user", where, "prompt")
                        + _as_messages(row.pop("completion"), "assistant", where, "completion"))
        else:
            missing = "completion" if "prompt" in row else "prompt" if "completion" in row else "messages"
            raise ValueError(f"{where}: missing column '{missing}' (a conversation needs 'messages', "
                             f"or 'prompt' and 'completion'); the row has columns {sorted(row)}")
        assistant = [m for m in messages if m["role"] == "assistant"]
        if not assistant:
            raise ValueError(f"{where}: the conversation has no assistant message "
                             f"(roles: {[m['role'] for m in messages]}); SFT needs a target turn")
        if "reasoning" in row:
            reasoning = row.pop("reasoning")
            if not isinstance(reasoning, str):
                raise ValueError(f"{where}: column 'reasoning' must be a string, got {_describe(reasoning)}")
            if "reasoning_content" in assistant[-1]:
                raise ValueError(f"{where}: column 'reasoning' given but the last assistant message "
                                 f"already has 'reasoning_content'; keep one")
            assistant[-1]["reasoning_content"] = reasoning
        row["messages"] = messages
        rows.append(row)
    _require_rows(rows, path)
    return rows


# ---------------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------------

# name -> (file in the data directory, published row count, kind). The count is checked on load: a
# truncated or substituted benchmark file would otherwise silently change every reported score.
EVAL_SETS = {
    "math500": ("math500.jsonl", 500, "math"),
    "aime24": ("aime24.jsonl", 30, "math"),
    "aime25": ("aime25.jsonl", 30, "math"),
    "amc23": ("amc23.jsonl", 40, "math"),
    "minerva": ("minerva_math.jsonl", 272, "math"),
    "olympiadbench": ("olympiadbench.jsonl", 675, "math"),
    "gsm8k": ("gsm8k_test.jsonl", 1319, "math"),
    "gsm8k_test": ("gsm8k_test.jsonl", 1319, "math"),
    "humaneval": ("humaneval.jsonl", 164, "code"),
    "mbpp": ("mbpp_test.jsonl", 500, "code"),   # MBPP's test split (task ids 11-510); its test_list asserts
}
# --eval-sets all-math / all-code / all: the benchmarks of a kind (gsm8k once)
EVAL_GROUPS = {"all-math": ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "gsm8k"),
               "all-code": ("humaneval", "mbpp")}
EVAL_GROUPS["all"] = EVAL_GROUPS["all-math"] + EVAL_GROUPS["all-code"]


def _mbpp_problem(row: dict) -> str:
    """MBPP's task as the model sees it: the text and its three asserts (they name the function),
    as MBPP's own prompt shows them."""
    tests = row.get("test_list") or []
    return f"{row['text']}\nYour code should pass these tests:\n\n" + "\n".join(tests)


_PROBLEM_BUILDERS = {"mbpp": _mbpp_problem}

# Where each source keeps its id and its problem text, first match wins:
# MATH-500 unique_id, AIME id, GSM8K idx, HumanEval task_id; MATH/AIME problem, GSM8K question,
# HumanEval prompt.
_ID_COLUMNS = ("id", "unique_id", "task_id", "idx")
_PROBLEM_COLUMNS = ("problem", "question", "prompt")


def eval_data_dir() -> Path | None:
    """The directory of the public benchmark files.

    `$R1_DATA_DIR` when set (FileNotFoundError if it names no directory); else `../shared/data`
    next to the project root (the directory holding the `data` package) when it exists; else None.
    """
    env = os.environ.get("R1_DATA_DIR")
    if env:
        d = Path(env).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"R1_DATA_DIR={env!r} is not a directory")
        return d
    d = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return d if d.is_dir() else None


def _normalise_eval_row(row: dict, where: str, kind: str | None, fallback_id: str) -> dict:
    """Add id, problem, kind and (math) answer to a row, keeping its columns; see load_eval_set."""
    out = dict(row)
    problem_col = next((c for c in _PROBLEM_COLUMNS if c in row), None)
    if problem_col is None:
        raise ValueError(f"{where}: missing column 'problem' (or 'question' / 'prompt'); "
                         f"the row has columns {sorted(row)}")
    if not isinstance(row[problem_col], str) or not row[problem_col].strip():
        raise ValueError(f"{where}: column '{problem_col}' must be a non-empty string, "
                         f"got {_describe(row[problem_col])}")
    out["problem"] = row[problem_col]

    id_col = next((c for c in _ID_COLUMNS if c in row), None)
    out["id"] = fallback_id if id_col is None else str(row[id_col])

    kind = kind or row.get("kind") or ("code" if "test" in row and "answer" not in row else "math")
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError(f"{where}: column 'kind' must be a non-empty string ('math', 'code', or a task "
                         f"name), got {_describe(kind)}")
    out["kind"] = kind
    if kind != "code":
        answer = row.get("answer")
        if answer is None:
            raise ValueError(f"{where}: missing column 'answer' (the gold answer; a code problem "
                             f"needs 'test' instead, with kind 'code' or no 'answer' column)")
        # Integer golds (common in user files) are accepted and written as strings; a float would
        # need a formatting choice (1e-05? 0.00001?) that belongs to the file's author.
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: column 'answer' must be a non-empty string (or an integer), "
                             f"got {_describe(answer)}")
        out["answer"] = answer
    elif not isinstance(row.get("test_list"), list) or not row["test_list"]:   # MBPP: its asserts
        test = row.get("test")
        if not isinstance(test, str) or not test.strip():
            raise ValueError(f"{where}: a code problem needs column 'test' (a non-empty string of test "
                             f"code) or 'test_list' (assert statements), got {_describe(test)}")
    return out


def load_eval_set(name_or_path, data_dir=None) -> list[dict]:
    """An evaluation set as normalised rows, in file order.

    `name_or_path` is a benchmark name (EVAL_SETS: math500, aime24, aime25, amc23, minerva,
    olympiadbench, gsm8k / gsm8k_test, humaneval, mbpp), looked up in `data_dir`, else in
    `eval_data_dir()`; or the path of a user's JSONL/Parquet file.

    Every row gets, on top of all its own columns:
      id       str: the source's id (id, unique_id, task_id or idx), else "<file stem>/<row number>"
      problem  str: MATH/AIME `problem`, GSM8K `question`, HumanEval `prompt` (first present);
               MBPP: its `text` and its asserts, as MBPP's prompt shows them
      kind     "math" or "code": fixed per benchmark; in a user's file its own `kind` column when
               present (kept as written, e.g. a synthetic task's name, since it routes the
               checker), else "code" when the row has `test` and no `answer`, else "math"
      answer   str gold, on every row whose kind is not "code"; code rows are judged by their
               `test` column (HumanEval also keeps `entry_point` and `canonical_solution`) or their
               `test_list` asserts (MBPP, with `test_setup_code`), in the sandbox
    Ids must be unique (pass@k and maj@k group samples by id). A benchmark's row count is checked
    against the published one.
    """
    name = str(name_or_path)
    if name in EVAL_SETS:
        filename, expected_rows, kind = EVAL_SETS[name]
        d = Path(data_dir) if data_dir is not None else eval_data_dir()
        if d is None:
            raise FileNotFoundError(f"benchmark '{name}': no data directory; pass data_dir or set "
                                    f"R1_DATA_DIR to the directory holding {filename}")
        path = d / filename
        if not path.is_file():
            raise FileNotFoundError(f"benchmark '{name}': {path} not found; pass data_dir or set "
                                    f"R1_DATA_DIR to the directory holding {filename}")
    else:
        path, expected_rows, kind = Path(name_or_path), None, None
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file (and not a benchmark name: "
                                    f"{', '.join(EVAL_SETS)})")

    rows, first_seen = [], {}
    build = _PROBLEM_BUILDERS.get(name)
    for i, (where, row) in enumerate(_iter_located(path), start=1):
        if build is not None:
            row = {**row, "problem": build(row)}
        out = _normalise_eval_row(row, where, kind, fallback_id=f"{path.stem}/{i}")
        if out["id"] in first_seen:
            raise ValueError(f"{where}: duplicate id {out['id']!r} (first at {first_seen[out['id']]})")
        first_seen[out["id"]] = where
        rows.append(out)
    _require_rows(rows, path)
    if expected_rows is not None and len(rows) != expected_rows:
        raise ValueError(f"{path}: benchmark '{name}' has {expected_rows} problems, the file holds "
                         f"{len(rows)}; it is incomplete or not the published set")
    return rows


# ---------------------------------------------------------------------------------------------
# Deterministic, sharded, resumable batch order
# ---------------------------------------------------------------------------------------------


def fit_global_batch(requested: int, num_rows: int, world_size: int, *, flag: str, what: str,
                     defaulted: bool = False) -> tuple[int, str | None]:
    """The rows per step (all ranks) to use for a data set of `num_rows` rows: (value, note).

    A requested value that fits (at most num_rows) is used as it is (note None). A default that
    does not fit shrinks to the largest multiple of world_size that does, and the note says so
    (a default must fit any run); an explicit value that does not fit, or data with fewer rows
    than ranks, is a ValueError naming the flag and `what` (e.g. "train.jsonl: 20 documents").
    """
    if requested <= num_rows:
        return requested, None
    fitted = num_rows // world_size * world_size
    if not defaulted or fitted < 1:
        raise ValueError(f"{flag} {requested}: {what}, fewer than one step's worth"
                         + (f" (and fewer than the {world_size} ranks)" if fitted < 1 else
                            f"; give {flag} {fitted} or less"))
    return fitted, f"{flag} {fitted} (default {requested} is more than {what}; the largest multiple of " \
                   f"{world_size} rank(s) that fits)"


class ShardedBatchSampler:
    """Per-rank batches of row indices: shuffled per epoch, sharded across ranks, resumable.

    Epoch e uses the permutation `default_rng([seed, e]).permutation(num_rows)` (or 0..N-1 when
    shuffle=False): a pure function of (seed, epoch), so any epoch can be rebuilt without replaying
    the ones before it. The permutation is cut into global steps of world_size * batch_size rows;
    at step s, rank r takes

        perm[s*W*B + r*B : s*W*B + (r+1)*B]          (W world_size, B batch_size per rank)

    so ranks are disjoint within an epoch, and the global batch of a step depends only on W*B (the
    same rows on 1 rank x 8 as on 2 ranks x 4). Remainder: the last N mod (W*B) rows of each
    epoch's permutation are dropped, so every rank runs the same number of steps and collectives
    stay in step; the dropped rows differ from epoch to epoch.

    `num_epochs=None` iterates forever; otherwise iteration stops after that many epochs.
    `state_dict()` records where the next batch comes from (epoch, position = batches already
    taken in that epoch); `load_state_dict` on a fresh sampler with the same settings continues the
    exact sequence. A state from a different data set size, world size, batch size, seed or
    shuffle setting is refused. The state is the same on every rank, so rank 0's copy can be saved.
    """

    def __init__(self, num_rows: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_rows < world_size * batch_size:
            raise ValueError(f"num_rows={num_rows} is less than one global batch "
                             f"(world_size {world_size} x batch_size {batch_size}); no step can be made")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy's SeedSequence takes non-negative ints), got {seed}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self.num_rows, self.batch_size = num_rows, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.steps_per_epoch = num_rows // (world_size * batch_size)
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global row order of `epoch` (all ranks, remainder included): int64[num_rows]."""
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def __iter__(self) -> ShardedBatchSampler:
        return self

    def __next__(self) -> list[int]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        if self._perm_epoch != self.epoch:  # one permutation per epoch, built on first use
            self._perm_epoch, self._perm = self.epoch, self.epoch_order(self.epoch)
        start = (self.position * self.world_size + self.rank) * self.batch_size
        batch = self._perm[start:start + self.batch_size].tolist()
        # The state always points at the next batch, so a state saved after the last batch of an
        # epoch already says (epoch + 1, 0).
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": self.num_rows, "world_size": self.world_size,
                "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_rows", "world_size", "batch_size", "seed", "shuffle"):
            if key not in state:
                raise ValueError(f"sampler state has no '{key}' (keys: {sorted(state)})")
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                                 f"{key}={getattr(self, key)!r}; resuming would not continue the same "
                                 f"order (start a fresh sampler instead)")
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"sampler state: 'epoch' must be an int >= 0, got {epoch!r}")
        if not isinstance(position, int) or not 0 <= position < self.steps_per_epoch:
            raise ValueError(f"sampler state: 'position' must be an int in [0, {self.steps_per_epoch}), "
                             f"got {position!r}")
        self.epoch, self.position = epoch, position
