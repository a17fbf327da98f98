"""Loading a checkpoint straight into FSDP2 shards (model.build.build_model with fsdp=..., and
model.checkpoint.plan_load / load_into): on 2 gloo ranks every gathered tensor equals the
one-process load bit for bit, for fp32 and bf16 targets, for tied and untied heads, MLA +
DeepSeekMoE with an MTP module, a bf16 checkpoint, an FP8 block-quantised one and tensors whose
rows do not split evenly; each rank holds about half the numbers; the export from the shards keeps
the checkpoint's dtype. Under the bf16 policy the router computes in fp32 and a block in bf16.
Bad checkpoints fail naming the tensor and its file before any weight is allocated.
"""
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.build import build_model
from model.checkpoint import checkpoint_dtype, save_pretrained
from model.config import ModelConfig
from tests.model.conftest import TINY, random_model
from tests.model.test_checkpoint import _FP8_CONFIG, _quantise_fp8

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_sharded_load_worker.py"


def _checkpoints(d: Path) -> list[Path]:
    out = []
    # odd sizes: vocab 301 and hidden 72 rows split 151/150 and 36/36; 3 kv heads of 12 -> 36 rows
    out.append(save_pretrained(random_model(ModelConfig(**TINY["qwen2-tied"]), seed=1), d / "qwen2-tied"))
    out.append(save_pretrained(random_model(ModelConfig(**TINY["llama"]), seed=2), d / "llama-bf16",
                               dtype=torch.bfloat16))
    moe = ModelConfig(**dict(TINY["deepseek_v3-moe"], num_nextn_predict_layers=1, bias_update_speed=1e-3))
    out.append(save_pretrained(random_model(moe, seed=3), d / "deepseek-moe", max_shard_bytes=200_000))
    fp8 = save_pretrained(random_model(ModelConfig(**_FP8_CONFIG), seed=4), d / "deepseek-fp8")
    tensors = load_file(fp8 / "model.safetensors")
    for name in list(tensors):
        if name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight"):
            tensors[name], tensors[name + "_scale_inv"] = _quantise_fp8(tensors[name])
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    out.append(fp8)
    return out


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded_load")
    paths = _checkpoints(d)
    out = d / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(out), *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
def test_each_rank_reads_its_rows_and_the_shards_equal_the_one_process_load(two_rank_results):
    for r in two_rank_results:
        assert r["ranks_seen"] == [0, 1]
        assert len(r["checkpoints"]) == 8
        for key, c in r["checkpoints"].items():
            assert c["unequal"] == [] and c["tensors"] > 10, key
            assert c["all_dtensor"], key
            assert abs(c["local_share"] - 0.5) < 0.05, (key, c["local_share"])
            assert c["logits_max_diff"] <= (1e-5 if key.endswith("float32") else 0.05), (key, c["logits_max_diff"])
        assert r["checkpoints"]["qwen2-tied/float32"]["tied"] and not r["checkpoints"]["llama-bf16/float32"]["tied"]


@pytest.mark.distributed
def test_the_export_from_shards_keeps_the_checkpoint_dtype(two_rank_results):
    exports = two_rank_results[0]["checkpoints"]
    for key, c in exports.items():
        assert c["export_equal"], key
    assert exports["llama-bf16/float32"]["export_stored_dtypes"] == ["torch.bfloat16"]   # bf16 stays bf16
    assert exports["qwen2-tied/bfloat16"]["export_stored_dtypes"] == ["torch.float32"]   # fp32 stays fp32
    assert exports["deepseek-fp8/float32"]["export_source"] == "torch.bfloat16"           # FP8 exports bf16
    # the MoE router's balancing bias stays fp32 in a bf16 export, as published V3 checkpoints store it
    assert "torch.float32" in exports["deepseek-fp8/float32"]["export_stored_dtypes"]


@pytest.mark.distributed
def test_bf16_policy_keeps_the_router_in_fp32(two_rank_results):
    for r in two_rank_results:
        p = r["policy"]
        assert p["routers"] >= 3     # two MoE layers and the MTP module's
        assert p["seen"]["router"] == {"weight": "torch.float32", "input": "torch.float32"}
        assert p["scores"] == "torch.float32"
        assert p["seen"]["o_proj"]["weight"] == "torch.bfloat16"      # the block computes in bf16
        assert p["hidden"] == "torch.bfloat16" and p["logp"] == "torch.float32"   # log-probs (and the loss) fp32
        assert p["router_master"] == p["proj_master"] == "torch.float32"   # fp32 master weights ...
        assert p["router_grad"] == p["proj_grad"] == "torch.float32"       # ... and gradients


def test_checkpoint_dtype_reads_headers_only(tmp_path):
    config = ModelConfig(**TINY["qwen2"])
    assert checkpoint_dtype(save_pretrained(random_model(config), tmp_path / "a")) == torch.float32
    assert checkpoint_dtype(save_pretrained(random_model(config), tmp_path / "b", dtype=torch.bfloat16)) == torch.bfloat16


def test_a_bad_checkpoint_fails_naming_the_tensor_before_any_weight_is_allocated(tmp_path, monkeypatch):
    from model.transformer import Transformer

    config = ModelConfig(**TINY["qwen2"])
    out = save_pretrained(random_model(config), tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    def no_allocation(self, *a, **k):
        raise AssertionError("weights were allocated before the checkpoint was checked")

    monkeypatch.setattr(Transformer, "to_empty", no_allocation)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape "
                                         r"\[99, 72\] in the checkpoint but \[100, 72\] in the model"):
        build_model(Namespace(model=str(out), preset=None, seed=0), None)


def test_length_and_rope_overrides_reach_the_model_and_its_export(tmp_path):
    from model.build import check_length, config_overrides, model_config

    out = save_pretrained(random_model(ModelConfig(**TINY["qwen2"])), tmp_path / "ckpt")   # 256 positions
    args = Namespace(model=str(out), preset=None, seed=0, max_position_embeddings=1024, rope_theta=300000.0,
                     rope_scaling='{"rope_type": "linear", "factor": 4.0}')
    model = build_model(args, None)
    assert (model.config.max_position_embeddings, model.config.rope_theta) == (1024, 300000.0)
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    exported = json.loads((save_pretrained(model, tmp_path / "long") / "config.json").read_text())
    assert exported["max_position_embeddings"] == 1024 and exported["rope_theta"] == 300000.0
    assert exported["rope_scaling"]["factor"] == 4.0
    plain = Namespace(model=str(out), preset=None)
    with pytest.raises(ValueError, match="needs 300 positions but the model .* has max_position_embeddings 256; to train "
                                         "past its length pass --max-position-embeddings 300 or more"):
        check_length(model_config(plain), 300, "the longest document", str(out))
    check_length(model_config(args), 300, "the longest document", str(out))
    for bad, message in [(dict(rope_scaling="{yarn"), "--rope-scaling '{yarn': not JSON"),
                         (dict(rope_theta=-1.0), "--rope-theta -1.0: expected a positive number"),
                         (dict(max_position_embeddings=0), "--max-position-embeddings 0: expected >= 1")]:
        with pytest.raises(ValueError, match=message):
            config_overrides(Namespace(**bad))


def test_param_dtype_auto_and_a_dtype_the_device_cannot_run(monkeypatch):
    from model.build import param_dtype_of

    assert param_dtype_of("auto", torch.device("cpu")) == torch.float32
    assert param_dtype_of("bf16", torch.device("cpu")) == torch.bfloat16      # slow on this CPU, but it runs
    assert param_dtype_of("auto", torch.device("cuda", 0)) == torch.bfloat16
    # a GPU without bf16 (before Ampere) is refused at start, naming it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))
    with pytest.raises(ValueError, match=r"--param-dtype bf16: Tesla V100-SXM2-32GB cannot compute in bf16 "
                                         r"\(compute capability \(7, 0\)\); use --param-dtype fp32"):
        param_dtype_of("bf16", torch.device("cuda", 0))
