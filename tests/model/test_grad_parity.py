"""Gradients equal transformers' on the same weights (the backward twin of test_parity's logits):
what every training loop relies on, checked for a dense model, MLA + DeepSeekMoE and Qwen3-MoE,
routed experts included."""
import pytest
import torch

from model.checkpoint import save_pretrained
from model.config import ModelConfig
from model.transformer import Transformer

CONFIGS = {
    "qwen2": dict(model_type="qwen2", vocab_size=120, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, attention_bias=True),
    "deepseek_v3-moe": dict(model_type="deepseek_v3", vocab_size=120, hidden_size=72, intermediate_size=100,
                            num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6, q_lora_rank=24,
                            kv_lora_rank=20, qk_nope_head_dim=14, qk_rope_head_dim=6, v_head_dim=10,
                            n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=40,
                            first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=120, hidden_size=72, intermediate_size=100, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, n_routed_experts=6,
                      num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True, mlp_only_layers=[1]),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_equal_transformers(name, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**CONFIGS[name])).train()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)  # far from ties in the router's top-k
    save_pretrained(ours, tmp_path / "m")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager",
                                                  dtype=torch.float32).train()
    ids, targets = torch.randint(0, 120, (2, 30)), torch.randint(0, 120, (2, 30))

    def nll(logits):
        return -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).sum()

    nll(ours(ids)).backward()
    nll(theirs(ids).logits).backward()
    theirs_params = dict(theirs.named_parameters())
    compared = 0
    for n, p in ours.named_parameters():
        if ".experts." in n:  # transformers fuses the routed experts: compared below, split per expert
            continue
        g, ref = p.grad, theirs_params[n].grad
        assert ((g - ref).norm() / ref.norm()).item() < 1e-4, n
        compared += 1
    assert compared > 10
    # the routed experts' gradients: transformers' fused [E, 2I, D] / [E, D, I] against ours per expert
    for i, layer in enumerate(ours.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        fused = f"model.layers.{i}.mlp.experts."
        gate_up, down = theirs_params[fused + "gate_up_proj"].grad, theirs_params[fused + "down_proj"].grad
        ref_gate, ref_up = gate_up.chunk(2, dim=1)
        for e, expert in enumerate(layer.mlp.experts):
            for ours_grad, ref in ((expert.gate_proj.weight.grad, ref_gate[e]), (expert.up_proj.weight.grad, ref_up[e]),
                                   (expert.down_proj.weight.grad, down[e])):
                if ref.norm() == 0:       # an expert no token chose: no gradient on either side
                    assert ours_grad is None or ours_grad.norm() == 0
                    continue
                assert ((ours_grad - ref).norm() / ref.norm()).item() < 1e-4, (i, e)
                compared += 1
    assert compared > 20
