"""Gradients equal transformers' on the same weights (the backward twin of test_parity's logits):
what every training loop relies on, checked for a dense model and for MLA + DeepSeekMoE."""
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
        if ".experts." in n:  # transformers fuses the routed experts; the MoE tests compare those
            continue
        g, ref = p.grad, theirs_params[n].grad
        assert ((g - ref).norm() / ref.norm()).item() < 1e-4, n
        compared += 1
    assert compared > 10
