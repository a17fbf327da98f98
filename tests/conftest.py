"""Shared test set-up.

- TRITON_INTERPRET=1 is set before anything imports triton, so Triton kernels run on Triton's CPU
  interpreter (tests ask for the Triton path explicitly; the default backend on CPU tensors is torch).
- The public benchmark files live outside the project (../shared/data by default, or the directory
  in R1_DATA_DIR). Tests that need them skip with a reason when they are absent, unless
  R1_REQUIRE_DATA=1 (set by .ci/run), which turns their absence into a failure.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The directory of the public eval files (math500.jsonl, aime24.jsonl, gsm8k_test.jsonl, humaneval.jsonl)."""
    from data.datasets import eval_data_dir

    d = eval_data_dir()
    if d is None or not (d / "math500.jsonl").exists():
        msg = (f"benchmark data not found (looked in R1_DATA_DIR={os.environ.get('R1_DATA_DIR')!r} "
               f"and {ROOT.parent / 'shared' / 'data'})")
        if os.environ.get("R1_REQUIRE_DATA") == "1":
            pytest.fail(msg + "; R1_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(msg)
    return d
