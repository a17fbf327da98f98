"""Checkpoint I/O: safetensors format, save/load round trips against transformers, FP8, errors, memory.

Oracles: the `safetensors` library (our reader and writer must agree with it byte for byte on
meaning) and transformers (AutoModelForCausalLM must load what save_pretrained writes and give the
same logits; what transformers saves, sharded, must load into ours with the same logits).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import _SafetensorsFile, _write_safetensors

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# the safetensors format, against the reference library
# ------------------------------------------------------------------------------------------------

def _assorted_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 13, generator=g),
        "b.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(4, generator=g).half(),
        "d.double": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "e.fp8": (torch.randn(3, 9, generator=g) * 10).to(torch.float8_e4m3fn),
        "f.int": torch.arange(-5, 6, dtype=torch.int64),
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.zeros(0, 4),
        "i.bool": torch.tensor([True, False, True]),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor torch.equal can compare exactly (float8 has no equality kernels: compare its bytes)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def test_reader_reads_what_the_safetensors_library_writes(tmp_path):
    tensors = _assorted_tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    file = _SafetensorsFile(tmp_path / "x.safetensors")
    assert set(file.entries) == set(tensors)
    with open(file.path, "rb") as f:
        for name, t in tensors.items():
            got = file.read(f, name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(_bits(got), _bits(t)), name
        # a partial read: elements [5, 12) of the flattened 7x13 matrix
        part = torch.empty(7)
        file.read_into(f, "a.weight", part, start=5)
        assert torch.equal(part, tensors["a.weight"].view(-1)[5:12])


def test_writer_output_is_read_by_the_safetensors_library(tmp_path):
    tensors = _assorted_tensors()
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    nbytes = _write_safetensors(tmp_path / "y.safetensors", specs, iter(tensors.values()))
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    back = load_file(tmp_path / "y.safetensors")
    for name, t in tensors.items():
        b = back[name]
        assert b.dtype == t.dtype and b.shape == t.shape, name
        assert torch.equal(_bits(b), _bits(t)), name


@pytest.mark.parametrize("cut", [1, 100, "header"])
def test_truncated_file_is_reported_with_its_name(tmp_path, cut):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "w.safetensors", metadata={"format": "pt"})
    raw = (tmp_path / "w.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    keep = 8 + n // 2 if cut == "header" else len(raw) - cut
    (tmp_path / "w.safetensors").write_bytes(raw[:keep])
    with pytest.raises(ValueError, match=r"w\.safetensors: truncated or corrupt"):
        _SafetensorsFile(tmp_path / "w.safetensors")
