"""Checkpoint I/O: safetensors format, save/load round trips against transformers, FP8, errors, memory.

Oracles: the `safetensors` library (our reader and writer must agree with it byte for byte on
meaning) and transformers (AutoModelForCausalLM must load what save_pretrained writes and give the
same logits; what transformers saves, sharded, must load into ours with the same logits).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer, load_pretrained, save_pretrained
from model.safetensors_io import SafetensorsFile, write_safetensors
from tests.model.conftest import TINY, hf_model_for, random_model, tiny_config

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
    file = SafetensorsFile(tmp_path / "x.safetensors")
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
    nbytes = write_safetensors(tmp_path / "y.safetensors", specs, iter(tensors.values()))
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
        SafetensorsFile(tmp_path / "w.safetensors")


# ------------------------------------------------------------------------------------------------
# tiny models of every family
# ------------------------------------------------------------------------------------------------

KINDS = ["qwen2", "qwen2-tied", "llama", "qwen3", "deepseek_v3", "deepseek_v3-moe", "qwen3_moe"]


def _config(kind: str, **overrides) -> ModelConfig:
    """conftest's tiny config with token ids; the MoE one also gets an MTP module and two eos ids."""
    extra = dict(bos_token_id=0, eos_token_id=1)
    if kind == "deepseek_v3-moe":
        extra.update(num_nextn_predict_layers=1, eos_token_id=[1, 2])
    return tiny_config(kind, **{**extra, **overrides})


def _ids(config: ModelConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))


def _hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", experts_implementation="eager",
                                              dtype=torch.float32)
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

@pytest.mark.parametrize("name", KINDS)
def test_transformers_loads_what_save_pretrained_writes(tmp_path, name):
    config = _config(name)
    model = random_model(config)
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


@pytest.mark.parametrize("name", KINDS)
def test_load_pretrained_reads_what_transformers_saves_sharded(tmp_path, name):
    config = _config(name)
    hf = hf_model_for(config)
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


def test_round_trip_is_exact_and_dtype_casts(tmp_path):
    config = _config("deepseek_v3-moe")
    model = random_model(config)
    save_pretrained(model, tmp_path / "fp32")
    assert (tmp_path / "fp32" / "model.safetensors").is_file()  # one shard: no index
    assert not (tmp_path / "fp32" / "model.safetensors.index.json").exists()
    back = load_pretrained(tmp_path / "fp32")
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert back.lm_head.weight is back.model.layers[3].shared_head.head.weight  # sharing survives loading

    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    on_disk = _tensors(tmp_path / "bf16")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert on_disk[bias].dtype == torch.float32  # the balancing bias is never rounded to bf16
    assert all(t.dtype == torch.bfloat16 for k, t in on_disk.items() if not k.endswith("e_score_correction_bias"))
    back = load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    state = back.state_dict()
    for k, t in ours.items():
        want = t if k.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
        assert torch.equal(state[k], want.to(state[k].dtype)), k  # the router stays fp32 in the model
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.float32


def test_tokenizer_and_generation_config_are_written(tmp_path):
    from data.tokenizer import Tokenizer

    tok = Tokenizer.train(["12 + 34 = 46", "<think>carry</think><answer>7</answer>"] * 20, vocab_size=300)
    config = tiny_config("qwen2-tied", vocab_size=tok.vocab_size)
    out = save_pretrained(random_model(config), tmp_path / "ckpt", tok)
    back = Tokenizer.from_pretrained(out)
    assert back.encode("<think>12 + 34</think>") == tok.encode("<think>12 + 34</think>")
    assert back.chat_template == tok.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == \
        (tok.bos_id, tok.eos_id, tok.pad_id)


def test_save_refuses_existing_folder_and_replaces_it_atomically(tmp_path):
    config = _config("qwen2-tied")
    target = save_pretrained(random_model(config, seed=0), tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(random_model(config, seed=1), target)
    new = random_model(config, seed=1)
    save_pretrained(new, target, overwrite=True)
    assert torch.equal(load_pretrained(target).lm_head.weight, new.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folders left

    class Broken:  # a tokenizer that fails half-way through the save
        def save(self, path):
            (Path(path) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(random_model(config, seed=2), target, Broken(), overwrite=True)
    assert torch.equal(load_pretrained(target).lm_head.weight, new.lm_head.weight)  # the old one is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_into_an_existing_empty_folder_as_transformers_does(tmp_path):
    import tempfile

    transformers = pytest.importorskip("transformers")
    config = _config("qwen2-tied")
    model = random_model(config, seed=3)
    with tempfile.TemporaryDirectory() as d:   # the usual target: an empty folder that already exists
        assert save_pretrained(model, d) == Path(d)
        assert (Path(d) / "model.safetensors").is_file() and (Path(d) / "config.json").is_file()
        assert torch.equal(load_pretrained(d).lm_head.weight, model.lm_head.weight)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d)
        assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
        assert sorted(p.name for p in Path(d).parent.iterdir() if p.name.startswith(f".{Path(d).name}")) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(model, empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]   # no temporary folder left beside it
    # a folder holding anything, even one stray file, is still refused without overwrite=True, and kept
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass overwrite=True"):
        save_pretrained(model, stray)
    assert [p.name for p in stray.iterdir()] == ["notes.txt"] and (stray / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# FP8 block-quantised checkpoints
# ------------------------------------------------------------------------------------------------

def _quantise_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight format: per 128x128 block, scale_inv = amax / 448 (e4m3's largest
    normal), w_fp8 = w / scale_inv. Returns (w_fp8 [O, I], scale_inv [ceil(O/b), ceil(I/b)] fp32)."""
    O, I = w.shape
    nb0, nb1 = math.ceil(O / block), math.ceil(I / block)
    padded = torch.zeros(nb0 * block, nb1 * block)
    padded[:O, :I] = w
    blocks = padded.view(nb0, block, nb1, block)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0                # [nb0, nb1]
    q = (blocks / scale_inv[:, None, :, None]).view(nb0 * block, nb1 * block)[:O, :I]
    return q.to(torch.float8_e4m3fn), scale_inv


def _dequantise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    O, I = q.shape
    full = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:O, :I]  # [O, I]
    return q.float() * full


_FP8_CONFIG = dict(model_type="deepseek_v3", vocab_size=301, hidden_size=200, intermediate_size=260,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=136,
                   kv_lora_rank=130, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=130,
                   first_k_dense_replace=1, max_position_embeddings=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_quantised_checkpoint_is_dequantised(tmp_path, dtype):
    config = ModelConfig(**_FP8_CONFIG)
    model = random_model(config)
    out = save_pretrained(model, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    reference = {}
    for name in list(tensors):
        if name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight"):  # the linear layers
            q, scale_inv = _quantise_fp8(tensors[name])
            tensors[name], tensors[name + "_scale_inv"] = q, scale_inv
            reference[name] = _dequantise(q, scale_inv)
    assert any(max(t.shape) > 128 and min(t.shape) % 128 for t in reference.values())  # partial blocks
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((out / "config.json").read_text())
    hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(hf_config))

    loaded = load_pretrained(out, dtype=dtype)
    state = loaded.state_dict()
    for name, want in reference.items():
        assert torch.equal(state[name], want.to(dtype)), name

    original = model.state_dict()
    for name, want in reference.items():  # e4m3 rounds to 3 mantissa bits: relative error <= 2^-4
        err = ((want - original[name]).norm() / original[name].norm()).item()
        assert 0 < err <= 2 ** -4, (name, err)

    ids = _ids(config)
    with torch.no_grad():
        exact, quantised = model(ids), loaded(ids).float()
    rel = ((quantised - exact).norm() / exact.norm()).item()
    # a few percent per weight, compounded over layers and an occasional flipped expert choice
    assert 0 < rel < 0.25, rel


def test_fp8_weight_without_scale_is_an_error(tmp_path):
    out = save_pretrained(random_model(ModelConfig(**_FP8_CONFIG)), tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' is "
                                         r"stored as torch\.float8_e4m3fn .* no 'model\.layers\.0\.mlp\.up_proj\.weight_scale_inv'"):
        load_pretrained(out)


def test_fp8_scale_of_the_wrong_shape_is_an_error(tmp_path):
    out = save_pretrained(random_model(ModelConfig(**_FP8_CONFIG)), tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"  # [260, 200]: blocks [3, 2]
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    tensors[name + "_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight_scale_inv' has shape \[2, 2\]; "
                                         r"expected \[3, 2\] for weight shape \[260, 200\] in blocks of \[128, 128\]"):
        load_pretrained(out)


# ------------------------------------------------------------------------------------------------
# errors a user can meet
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def saved_qwen2(tmp_path) -> Path:
    return save_pretrained(random_model(_config("qwen2")), tmp_path / "ckpt")


def _edit(directory: Path, fn) -> None:
    tensors = load_file(directory / "model.safetensors")
    fn(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_an_error_naming_it(saved_qwen2):
    _edit(saved_qwen2, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) .*: 1: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(saved_qwen2)
    with pytest.warns(UserWarning, match=r"missing tensor\(s\)"):
        model = load_pretrained(saved_qwen2, strict=False)
    assert torch.isfinite(model.layers[1].mlp.up_proj.weight).all()  # initialised, not left empty


def test_many_missing_keys_are_counted(saved_qwen2):
    _edit(saved_qwen2, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.")]])
    with pytest.raises(ValueError, match=r"missing tensor\(s\) .*: 24: .*, \.\.\. \(14 more\)"):
        load_pretrained(saved_qwen2)


def test_unexpected_key_is_an_error_naming_it(saved_qwen2):
    _edit(saved_qwen2, lambda t: t.update({"model.layers.1.self_attn.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) .*: 1: model\.layers\.1\.self_attn\.extra\.weight"):
        load_pretrained(saved_qwen2)


def test_shape_mismatch_names_tensor_file_and_both_shapes(saved_qwen2):
    config = json.loads((saved_qwen2 / "config.json").read_text())
    (saved_qwen2 / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                         r"has shape \[100, 72\] in the checkpoint but \[96, 72\] in the model .*"
                                         r"5 more tensor\(s\) mismatch: 5: model\.layers\.0\.mlp\.down_proj\.weight"):
        load_pretrained(saved_qwen2)


def test_truncated_shard_is_reported_with_its_file(tmp_path):
    out = save_pretrained(random_model(_config("qwen2")), tmp_path / "ckpt",
                          max_shard_bytes=60_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"{shard.name}: truncated or corrupt safetensors file"):
        load_pretrained(out)


def test_missing_mtp_weights_warn_or_fail_by_loss_weight(tmp_path):
    config = _config("deepseek_v3-moe")
    out = save_pretrained(random_model(config), tmp_path / "ckpt")
    _edit(out, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.3.")]])
    with pytest.warns(UserWarning, match=r"lacks the MTP weights \(\d+: model\.layers\.3\."):
        model = load_pretrained(out)
    assert all(torch.isfinite(t).all() for t in model.mtp.state_dict().values())
    with pytest.raises(ValueError, match=r"lacks the MTP weights .* mtp_loss_weight is 0\.3"):
        load_pretrained(out, config_overrides={"mtp_loss_weight": 0.3})
    # dropping MTP through the config loads without a word, and a published checkpoint's MTP
    # tensors are skipped when MTP is dropped
    load_pretrained(out, config_overrides={"num_nextn_predict_layers": 0})
    full = save_pretrained(random_model(config), tmp_path / "full")
    model = load_pretrained(full, config_overrides={"num_nextn_predict_layers": 0})
    assert len(model.mtp) == 0


def test_mtp_copies_of_embedding_and_head_do_not_replace_the_main_ones(tmp_path):
    config = _config("deepseek_v3-moe")
    model = random_model(config)
    out = save_pretrained(model, tmp_path / "ckpt")
    n = config.num_hidden_layers
    _edit(out, lambda t: t.update({f"model.layers.{n}.embed_tokens.weight": torch.zeros(301, 72),
                                   f"model.layers.{n}.shared_head.head.weight": torch.zeros(301, 72)}))
    back = load_pretrained(out)
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert back.model.layers[n].shared_head.head.weight is back.lm_head.weight


def test_config_errors_name_the_file(saved_qwen2):
    config = json.loads((saved_qwen2 / "config.json").read_text())
    (saved_qwen2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"ckpt/config\.json: model_type 'gpt2' is not supported"):
        load_pretrained(saved_qwen2)
    del config["hidden_size"]
    (saved_qwen2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ckpt/config\.json: missing config key 'hidden_size'"):
        load_pretrained(saved_qwen2)
    (saved_qwen2 / "config.json").write_text("{\n  \"model_type\": \"qwen2\",\n}")
    with pytest.raises(ValueError, match=r"ckpt/config\.json:3:1: invalid JSON"):
        load_pretrained(saved_qwen2)
    (saved_qwen2 / "config.json").write_text(json.dumps({**config, "hidden_size": 72}))
    with pytest.raises(ValueError, match=r"config_overrides: unknown ModelConfig field\(s\) \['hidden'\]"):
        load_pretrained(saved_qwen2, config_overrides={"hidden": 3})
    (saved_qwen2 / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/config\.json: no such file"):
        load_pretrained(saved_qwen2)


def test_folder_without_weights_is_an_error(saved_qwen2):
    (saved_qwen2 / "model.safetensors").rename(saved_qwen2 / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json; "
                                                r"found only \['pytorch_model\.bin'\]"):
        load_pretrained(saved_qwen2)


# ------------------------------------------------------------------------------------------------
# memory: loading holds one copy of the weights
# ------------------------------------------------------------------------------------------------

def test_load_peak_memory_is_the_weights_plus_a_chunk(tmp_path):
    # one process: peak RSS above the pre-load level at most 1.2x the fp32 checkpoint for an fp32
    # target, 0.7x for bf16 (whose weights are half the checkpoint's bytes): no second copy
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "load_memory.py"), "--ranks", "1", "--size", "small",
                           "--dir", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    assert result["ranks"] == 1 and result["goal"] == {"fp32": 1.2, "bf16": 0.7}
    for dtype, ratios in result["ratio_per_rank"].items():
        assert len(ratios) == 1 and ratios[0] <= result["goal"][dtype], (dtype, ratios, proc.stdout)


# ------------------------------------------------------------------------------------------------
# FSDP2: every rank gathers, rank 0 writes
# ------------------------------------------------------------------------------------------------

_FSDP_WORKER = '''
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from model import ModelConfig, Transformer, load_pretrained, save_pretrained
from model.parallel import apply_fsdp

dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[1])
config = ModelConfig(**json.loads(sys.argv[2]))
torch.manual_seed(0)
model = Transformer(config)
reference = {k: v.clone() for k, v in model.state_dict().items()}
apply_fsdp(model)
sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
save_pretrained(model, out / "ckpt", max_shard_bytes=60_000)
result = {"rank": rank, "sharded": sharded, "listing": sorted(p.name for p in out.iterdir())}
if rank == 0:
    back = load_pretrained(out / "ckpt").state_dict()
    result["equal"] = back.keys() == reference.keys() and all(torch.equal(back[k], reference[k]) for k in back)
try:  # refused on every rank, not only on the writer
    save_pretrained(model, out / "ckpt")
except FileExistsError as e:
    result["refused"] = str(e)
(out.parent / f"rank{rank}.json").write_text(json.dumps(result))
del model
from runtime.distributed import teardown  # collects FSDP's garbage first: gloo can abort at exit otherwise
teardown()
'''


@pytest.mark.distributed
def test_fsdp_sharded_model_is_gathered_and_written_by_rank_0(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_FSDP_WORKER)
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "out"), json.dumps(dict(TINY["deepseek_v3-moe"], num_nextn_predict_layers=1))],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"] for r in results)
    assert results[0]["equal"]
    assert results[0]["listing"] == results[1]["listing"] == ["ckpt"]  # no temporary folders left
    assert all("already exists" in r["refused"] for r in results)
