"""Multi-token prediction: module layout (HF names, shared embedding and head), the loss equals a
hand-written computation with the same submodules (depths 1 and 2), gradients reach the MTP modules
and the trunk, packed documents are never crossed, and λ = 0 / no MTP layers cost nothing."""
import torch
import torch.nn.functional as F

from model.transformer import Transformer
from tests.model.conftest import random_model, tiny_config


def _hand_mtp_loss(model, ids, lam):
    """λ/K Σ_k mean_t CE(head(norm(Block_k(eh_proj([enorm(E x_{t+k}); hnorm(h^{k-1}_t)])))), x_{t+k+1}),
    written on truncated sequences (so no masking is involved)."""
    B, T = ids.shape
    h = model.forward_hidden(ids)
    losses = []
    for k, layer in enumerate(model.mtp, start=1):
        n = T - k  # positions t = 0..T-k-1 have x_{t+k}
        e = layer.enorm(model.model.embed_tokens(ids[:, k:]))                     # [B, n, D]
        x = layer.eh_proj(torch.cat([e, layer.hnorm(h[:, :n])], dim=-1))
        cos, sin = model.rope(torch.arange(n).expand(B, n))
        h = layer(x, cos, sin)                                                     # [B, n, D]
        logits = layer.shared_head.norm(h[:, : T - k - 1]) @ model.lm_head.weight.T  # targets x_{t+k+1}
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, k + 1:].reshape(-1)))
    return lam * sum(losses) / len(losses), losses


def test_layout_names_and_shared_weights():
    config = tiny_config("deepseek_v3-moe", num_nextn_predict_layers=1)
    model = Transformer(config)
    N = config.num_hidden_layers
    names = set(model.state_dict())
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                "shared_head.norm.weight", "shared_head.head.weight", "input_layernorm.weight",
                "self_attn.kv_b_proj.weight", "post_attention_layernorm.weight", "mlp.gate.weight"):
        assert f"model.layers.{N}.{key}" in names, key
    assert model.model.layers[N].eh_proj.weight.shape == (config.hidden_size, 2 * config.hidden_size)
    (mtp,) = model.mtp
    assert mtp.embed_tokens.weight is model.model.embed_tokens.weight
    assert mtp.shared_head.head.weight is model.lm_head.weight
    assert len(model.layers) == N
    # none built when num_nextn_predict_layers is 0
    plain = Transformer(tiny_config("deepseek_v3-moe"))
    assert len(plain.mtp) == 0 and not any(k.startswith(f"model.layers.{N}.") for k in plain.state_dict())


def test_loss_equals_hand_computation_and_trains_trunk_and_module():
    for kind, depth in (("deepseek_v3-moe", 1), ("deepseek_v3", 2)):
        config = tiny_config(kind, num_nextn_predict_layers=depth, mtp_loss_weight=0.3)
        model = random_model(config, seed=9)
        ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
        loss, metrics = model.mtp_loss(model.forward_hidden(ids), ids)
        ref, parts = _hand_mtp_loss(model, ids, 0.3)
        assert torch.isfinite(loss)
        assert abs(loss.item() - ref.item()) <= 1e-5, (kind, loss.item(), ref.item())
        assert sorted(metrics) == [f"mtp_loss/{k}" for k in range(1, depth + 1)]
        for k, part in enumerate(parts, start=1):
            assert abs(metrics[f"mtp_loss/{k}"] - part.item()) <= 1e-5
        model.zero_grad()
        loss.backward()
        N = config.num_hidden_layers
        for name in (f"model.layers.{N}.eh_proj.weight", f"model.layers.{N}.enorm.weight",
                     f"model.layers.{N}.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                     "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            grad = dict(model.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_forward_with_mtp_loss_equals_the_separate_call():
    config = tiny_config("deepseek_v3", num_nextn_predict_layers=1, mtp_loss_weight=0.5)
    model = random_model(config, seed=12)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.rand(2, 8, generator=torch.Generator().manual_seed(8)) > 0.3
    with torch.no_grad():
        h, (loss, metrics) = model(ids, return_hidden=True, with_mtp_loss=True, target_mask=mask)
        logits, (loss2, _) = model(ids, with_mtp_loss=True, target_mask=mask)
        ref, ref_metrics = model.mtp_loss(model.forward_hidden(ids), ids, target_mask=mask)
    assert torch.equal(h, model.forward_hidden(ids)) and logits.shape == (2, 8, config.vocab_size)
    assert loss.item() == ref.item() == loss2.item() and metrics == ref_metrics


def test_packed_documents_are_not_crossed():
    config = tiny_config("deepseek_v3", num_nextn_predict_layers=1, mtp_loss_weight=1.0)
    model = random_model(config, seed=10)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in (7, 2, 5)]
    ids = torch.cat(docs)[None]
    cu = torch.tensor([0, 7, 9, 14], dtype=torch.int32)
    with torch.no_grad():
        packed, _ = model.mtp_loss(model.forward_hidden(ids, cu_seqlens=cu), ids, cu_seqlens=cu)
        # the mean over all counted targets = Σ_doc (mean_doc · count_doc) / Σ count_doc
        total, count = 0.0, 0
        for d in docs:
            if len(d) > 2:
                loss_d, _ = model.mtp_loss(model.forward_hidden(d[None]), d[None])
                total += loss_d.item() * (len(d) - 2)
                count += len(d) - 2
    assert abs(packed.item() - total / count) <= 1e-5


def test_target_mask_restricts_the_counted_targets():
    config = tiny_config("deepseek_v3", num_nextn_predict_layers=1, mtp_loss_weight=1.0)
    model = random_model(config, seed=11)
    ids = torch.randint(0, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 6:] = True  # only targets x_6..x_9 count: predicted from positions 4..7
    with torch.no_grad():
        h = model.forward_hidden(ids)
        masked, _ = model.mtp_loss(h, ids, target_mask=mask)
        _, parts = _hand_mtp_loss(model, ids, 1.0)
        # recompute the per-position CE by hand and average positions 4..7
        layer = model.mtp[0]
        x = layer.eh_proj(torch.cat([layer.enorm(model.model.embed_tokens(ids[:, 1:])), layer.hnorm(h[:, :9])], -1))
        cos, sin = model.rope(torch.arange(9)[None])
        logits = layer.shared_head.norm(layer(x, cos, sin)) @ model.lm_head.weight.T  # [1, 9, V]
        ce = F.cross_entropy(logits[0, 4:8], ids[0, 6:10])
    assert abs(masked.item() - ce.item()) <= 1e-5


def test_zero_weight_skips_the_modules():
    config = tiny_config("deepseek_v3", num_nextn_predict_layers=1, mtp_loss_weight=0.0)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (1, 6))
    loss, metrics = model.mtp_loss(model.forward_hidden(ids), ids)
    assert loss.item() == 0.0 and metrics == {}
    loss.backward() if loss.requires_grad else None
    assert all(p.grad is None for p in model.mtp.parameters())
