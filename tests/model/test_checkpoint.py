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


# ------------------------------------------------------------------------------------------------
# tiny models of every family
# ------------------------------------------------------------------------------------------------

from model import ModelConfig, Transformer, load_pretrained, save_pretrained  # noqa: E402

_DENSE = dict(vocab_size=301, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=0, eos_token_id=1)
_DSV3 = dict(model_type="deepseek_v3", vocab_size=301, hidden_size=72, intermediate_size=100,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
             q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
             rope_interleave=True, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             moe_intermediate_size=40, first_k_dense_replace=1, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=[1, 2],
             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
CONFIGS = {
    "qwen2-tied": dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True, **_DENSE),
    "qwen2-untied": dict(model_type="qwen2", attention_bias=True, **_DENSE),
    "llama": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  **_DENSE),
    "qwen3": dict(model_type="qwen3", head_dim=16, qk_norm=True, **_DENSE),
    "deepseek_v3": _DSV3,
}


def _random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose every tensor (norm weights, biases, router bias included) is random, so a
    tensor that is lost or misplaced on the way changes the logits."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    return model.eval()


def _ids(config: ModelConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))


def _hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return hf.eval()(ids).logits


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------------------------------------
# round trips with transformers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_loads_what_save_pretrained_writes(tmp_path, name):
    config = ModelConfig(**CONFIGS[name])
    model = _random_model(config)
    out = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=60_000)
    ids = _ids(config)
    with torch.no_grad():
        ours = model(ids)
    theirs = _hf_logits(out, ids)
    assert (ours - theirs).abs().max().item() <= 1e-4

    # sharded layout: every tensor listed once, in a file that holds it; total_size adds up
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    on_disk = _tensors(out)
    assert set(on_disk) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    assert ("lm_head.weight" in on_disk) == (not config.tie_word_embeddings)
    state = model.state_dict()
    assert all(torch.equal(on_disk[k], state[k]) for k in on_disk)

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["torch_dtype"] == hf_config["dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 0 and generation["eos_token_id"] == config.eos_token_id
    if config.num_nextn_predict_layers:  # MTP in the published layout, after the main layers
        n = config.num_hidden_layers
        for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                    "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.up_proj.weight",
                    "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{n}.{key}" in on_disk, key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_pretrained_reads_what_transformers_saves_sharded(tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = ModelConfig(**CONFIGS[name])
    hf_dict = config.to_hf_config()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict),
                                          attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.05)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids = _ids(config)
    with torch.no_grad():
        theirs = hf.eval()(ids).logits

    if config.num_nextn_predict_layers:  # transformers declares MTP but does not save it
        with pytest.warns(UserWarning, match="lacks the MTP weights"):
            model = load_pretrained(tmp_path / "hf")
    else:
        model = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ours = model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
