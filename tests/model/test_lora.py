"""LoRA (model/lora.py) against peft on transformers' models, for a qwen2 and a deepseek_v3 tiny config:
our adapted model's logits equal the merged export's (loaded by transformers) and our PEFT adapter's
(loaded by peft onto the transformers base), and a peft-made adapter loads onto ours with equal
logits; merging restores the base weights bit for bit; bad targets and foreign adapters are refused
naming what is wrong."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is the LoRA tests' oracle (the test extra)")

from model.checkpoint import save_pretrained  # noqa: E402
from model.lora import LoRALinear, apply_lora, load_adapter, lora_parameters, merged, save_adapter  # noqa: E402
from tests.model.conftest import random_model, tiny_config  # noqa: E402

# peft rewrites DeepSeek-V3's gate_proj / up_proj / down_proj targets into its fused-expert
# parameters (target_parameters), so its MLA comparisons target the attention; the merged export is
# also checked with the dense MLP targeted (test_merged_export_with_the_mlp_targeted)
TARGETS = {"qwen2": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
           "deepseek_v3": "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"}


def _ids(config):
    return torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def _adapted(kind, seed=0, rslora=False, targets=None):
    config = tiny_config(kind)
    model = random_model(config, seed).eval()
    apply_lora(model, targets or TARGETS[kind], rank=4, alpha=8, rslora=rslora)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # B starts at 0 (the base exactly); give it values so the adapter shows
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return config, model


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
@pytest.mark.parametrize("rslora", [False, True])
def test_merged_export_and_peft_adapter_give_our_logits(kind, rslora, tmp_path):
    config, model = _adapted(kind, rslora=rslora)
    ids = _ids(config)
    with torch.no_grad():
        ours = model(ids)
    assert not torch.allclose(ours, _base_logits(model, ids), atol=1e-3)   # the adapter changes the model

    save_pretrained(model, tmp_path / "merged")   # merged by default
    assert not list((tmp_path / "merged").glob("adapter*"))              # no adapter files beside the merged model
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "merged")(ids).logits, ours, atol=1e-4, rtol=0)

    save_pretrained(model, tmp_path / "base", adapters="drop")            # the base alone (adapters left out)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    with_peft = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_peft(ids).logits, ours, atol=1e-4, rtol=0)


def test_merged_export_with_the_mlp_targeted(tmp_path):
    config, model = _adapted("deepseek_v3", targets=TARGETS["deepseek_v3"] + ",gate_proj,up_proj,down_proj")
    ids = _ids(config)
    save_pretrained(model, tmp_path / "merged")   # merged by default
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "merged")(ids).logits, model(ids), atol=1e-4, rtol=0)


def _base_logits(model, ids):
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.merged = True       # forward without the adapter term (the weights are the base's)
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        for m in layers:
            m.merged = False


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_a_peft_made_adapter_loads_onto_ours(kind, tmp_path):
    config = tiny_config(kind)
    model = random_model(config, 0).eval()
    save_pretrained(model, tmp_path / "base")
    hf = _hf(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[kind].split(","), init_lora_weights=False,
                           lora_dropout=0.0)
    with_peft = peft.get_peft_model(hf, lora).eval()
    with_peft.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    ids = _ids(config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), with_peft(ids).logits, atol=1e-4, rtol=0)


def test_merging_restores_the_base_weights_exactly_and_changes_nothing_seen():
    config, model = _adapted("deepseek_v3")
    model.to(torch.bfloat16)   # a bf16 base: an un-merge by subtraction would not come back exactly
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(config)
    with torch.no_grad():
        unmerged = model(ids).float()
        with merged(model):
            inside = model(ids).float()
            kv = model.model.layers[0].self_attn.kv_b_proj
            assert kv.merged and not torch.equal(kv.weight, before["model.layers.0.self_attn.kv_b_proj.weight"])
    torch.testing.assert_close(inside, unmerged, atol=0.1, rtol=0.05)   # bf16 rounding of the merge only
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # bit for bit


def test_only_the_adapters_train():
    _, model = _adapted("qwen2")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * 2   # A and B of 7 targets in each of 2 layers
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()   # the base's names did not move


def test_bad_targets_and_foreign_adapters_are_refused(tmp_path):
    model = random_model(tiny_config("qwen2"), 0)
    with pytest.raises(ValueError, match=r"'kv_b_proj' matches no linear layer .*named down_proj, gate_proj, "
                                         r"k_proj, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(model, "q_proj,kv_b_proj")
    _, adapted = _adapted("qwen2")
    save_adapter(adapted, tmp_path / "qwen2")
    other = random_model(tiny_config("qwen2", hidden_size=48, num_attention_heads=4), 0)
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\."
                                         r"weight' has shape \[4, 72\] but this model's layer needs \[4, 48\]"):
        load_adapter(other, tmp_path / "qwen2")
    with pytest.raises(ValueError, match="matches no linear layer"):
        load_adapter(random_model(tiny_config("deepseek_v3"), 0), tmp_path / "qwen2")   # k_proj: not in MLA
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
