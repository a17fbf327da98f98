"""DeepSeekMoE (model/moe.py): parity with transformers' DeepSeek-V3/V2 MoE layers, the sorted
dispatch against the per-expert loop (values and gradients), the role of the correction bias,
aux-loss-free balancing (one process and two gloo ranks), the balance loss, load statistics."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.moe import MoE, Router, moe_aux_loss, moe_forward_reference, moe_load_stats, \
    sequence_balance_loss, update_moe_biases

ROOT = Path(__file__).resolve().parents[2]

# odd sizes on purpose: D=37, I=19, 12 experts in 4 groups, top-3 within the best 2 groups
SIZES = dict(hidden_size=37, n_routed_experts=12, num_experts_per_tok=3, moe_intermediate_size=19,
             n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def make_config(**overrides) -> ModelConfig:
    kw = dict(model_type="deepseek_v3", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
              **SIZES)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_moe(seed=0, bias_std=0.1, **overrides) -> MoE:
    """An MoE whose routing depends on the token (gate rows of norm ~1) with a nonzero bias."""
    torch.manual_seed(seed)
    moe = MoE(make_config(**overrides), layer_idx=3)
    with torch.no_grad():
        moe.gate.weight.normal_(0, moe.hidden_size ** -0.5)
        moe.gate.e_score_correction_bias.normal_(0, bias_std)
    return moe


def fused_hf_state(moe: MoE) -> dict:
    """Our per-expert weights in transformers' in-memory fused layout."""
    sd = {k: v.detach().clone() for k, v in moe.state_dict().items() if not k.startswith("experts.")}
    sd["experts.gate_up_proj"] = torch.stack(
        [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts]).detach()  # [E, 2I, D]
    sd["experts.down_proj"] = torch.stack([e.down_proj.weight for e in moe.experts]).detach()  # [E, D, I]
    return sd


def hf_kwargs(moe_cfg: ModelConfig) -> dict:
    return dict(hidden_size=moe_cfg.hidden_size, num_attention_heads=1, num_key_value_heads=1,
                n_routed_experts=moe_cfg.n_routed_experts, num_experts_per_tok=moe_cfg.num_experts_per_tok,
                moe_intermediate_size=moe_cfg.moe_intermediate_size, n_shared_experts=moe_cfg.n_shared_experts,
                n_group=moe_cfg.n_group, topk_group=moe_cfg.topk_group,
                routed_scaling_factor=moe_cfg.routed_scaling_factor, experts_implementation="eager")


# ---- parity with transformers ---------------------------------------------------------------------

@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_deepseek_v3_moe(norm_topk_prob):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    ours = make_moe(norm_topk_prob=norm_topk_prob)
    cfg = make_config(norm_topk_prob=norm_topk_prob)
    hf = DeepseekV3MoE(DeepseekV3Config(**hf_kwargs(cfg), norm_topk_prob=norm_topk_prob))
    hf.load_state_dict(fused_hf_state(ours), strict=True)
    assert ours.gate.e_score_correction_bias.abs().min() > 0

    x = torch.randn(3, 17, cfg.hidden_size)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_hf = ours(xa), hf(xb)
    assert (y_ours - y_hf).abs().max() <= 1e-5
    # the bias changed the choice for some tokens (so the test exercises it)
    with torch.no_grad():
        r = ours.gate(x.view(-1, cfg.hidden_size))
        unbiased = r.scores.topk(cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values
        assert (unbiased != r.topk_idx.sort(-1).values).any()

    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_hf.backward(dy)
    assert (xa.grad - xb.grad).abs().max() <= 1e-5
    assert (ours.gate.weight.grad - hf.gate.weight.grad).abs().max() <= 1e-5
    assert (ours.shared_experts.up_proj.weight.grad - hf.shared_experts.up_proj.weight.grad).abs().max() <= 1e-5
    hf_down = hf.experts.down_proj.grad  # [E, D, I]
    for e, expert in enumerate(ours.experts):
        assert (expert.down_proj.weight.grad - hf_down[e]).abs().max() <= 1e-5


def test_softmax_scoring_matches_transformers_deepseek_v2_moe():
    """V2 routing: softmax scores, group score = best expert of the group, no renormalisation."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    ours = make_moe(bias_std=0.0, scoring_func="softmax", norm_topk_prob=False)
    cfg = make_config(scoring_func="softmax", norm_topk_prob=False)
    hf = DeepseekV2Moe(DeepseekV2Config(**hf_kwargs(cfg), topk_method="group_limited_greedy"))
    state = fused_hf_state(ours)
    state.pop("gate.e_score_correction_bias")  # V2 has none; ours is zero here
    hf.load_state_dict(state, strict=True)
    x = torch.randn(2, 29, cfg.hidden_size)
    assert (ours(x) - hf(x)).abs().max() <= 1e-5


def brute_force_routing(scores: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig):
    """Token by token, in plain Python: the selection and combine weights the docstring describes."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    size = e // cfg.n_group
    idx, weights = [], []
    for s in scores.tolist():
        biased = [s[i] + bias[i].item() for i in range(e)]
        group_score = []
        for gi in range(cfg.n_group):
            members = sorted(biased[gi * size:(gi + 1) * size], reverse=True)
            group_score.append(sum(members[:2]) if cfg.scoring_func == "sigmoid" else members[0])
        groups = sorted(range(cfg.n_group), key=lambda gi: -group_score[gi])[:cfg.topk_group]
        eligible = [i for i in range(e) if i // size in groups]
        chosen = sorted(eligible, key=lambda i: -biased[i])[:k]
        w = [s[i] for i in chosen]
        if cfg.norm_topk_prob:
            w = [v / sum(w) for v in w]
        idx.append(chosen)
        weights.append([v * cfg.routed_scaling_factor for v in w])
    return idx, weights


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_routing_matches_brute_force_with_bias_and_normalisation(scoring_func):
    cfg = make_config(scoring_func=scoring_func, norm_topk_prob=True)
    moe = make_moe(bias_std=0.05, scoring_func=scoring_func, norm_topk_prob=True)
    x = torch.randn(40, cfg.hidden_size)
    r = moe.gate(x)
    expected_scores = x @ moe.gate.weight.t()
    expected_scores = expected_scores.sigmoid() if scoring_func == "sigmoid" else expected_scores.softmax(-1)
    assert torch.allclose(r.scores, expected_scores, atol=1e-6)
    idx, weights = brute_force_routing(expected_scores, moe.gate.e_score_correction_bias, cfg)
    for t in range(x.shape[0]):
        got = dict(zip(r.topk_idx[t].tolist(), r.topk_weight[t].tolist()))
        want = dict(zip(idx[t], weights[t]))
        assert got.keys() == want.keys()
        assert all(math.isclose(got[i], want[i], rel_tol=1e-5) for i in want)


# ---- the sorted dispatch is the per-expert loop ---------------------------------------------------

def test_sorted_dispatch_equals_per_expert_loop_fp64_with_gradients():
    moe = make_moe(bias_std=0.1).double()
    with torch.no_grad():
        moe.gate.e_score_correction_bias[5] = -100.0  # expert 5 never chosen: the empty-slice path
    d = moe.hidden_size
    x = torch.randn(2, 23, d, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)

    y = moe(x)
    y.backward(dy)
    ours = {n: p.grad.clone() for n, p in moe.named_parameters()}
    ours_x = x.grad.clone()
    assert moe.last_load[5] == 0 and (moe.last_load > 0).sum() >= 8

    moe.zero_grad(set_to_none=True)
    x.grad = None
    x2 = x.view(-1, d)
    ref = moe.shared_experts(x2) + moe_forward_reference(x2, moe.gate(x2), moe.experts)
    ref.view_as(x).backward(dy)

    assert (y - ref.view_as(x)).abs().max() <= 1e-10
    assert (ours_x - x.grad).abs().max() <= 1e-10
    for name, p in moe.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)  # the loop never touches expert 5
        assert (ours[name] - want).abs().max() <= 1e-10, name
    assert ours["gate.weight"].abs().max() > 0  # the combine weights carry gradient to the router
    assert ours["experts.5.gate_proj.weight"].abs().max() == 0


def test_static_dispatch_equals_sorted_dispatch():
    """The fixed-shape dense path (for compiled decode) computes the same values, gradients, loads."""
    moe = make_moe().double().train()
    x = torch.randn(3, 5, moe.hidden_size, dtype=torch.float64)
    results = []
    for static in (False, True):
        moe.static_dispatch = static
        moe.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = moe(xg)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xg.grad, moe.last_load.clone(),
                        {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}))
    (y0, gx0, load0, g0), (y1, gx1, load1, g1) = results
    assert (y0 - y1).abs().max() <= 1e-12 and (gx0 - gx1).abs().max() <= 1e-12
    assert torch.equal(load0, load1)
    assert moe._load_since_update.tolist() == (2 * load0).tolist()  # both training forwards counted
    for name, grad in g1.items():  # the dense path gives unused experts zero gradients, not None
        assert (g0.get(name, torch.zeros_like(grad)) - grad).abs().max() <= 1e-12, name


@pytest.mark.slow
def test_static_dispatch_compiles_fullgraph():
    moe = make_moe().eval()
    x = torch.randn(4, 1, moe.hidden_size)
    with torch.no_grad():
        ref = moe(x)
        load = moe.last_load.clone()
        moe.static_dispatch = True
        y = torch.compile(moe, fullgraph=True, dynamic=False)(x)
    assert (y - ref).abs().max() <= 1e-5 and torch.equal(moe.last_load, load)


def test_frozen_experts_and_no_grad_input():
    """Only the requested gradients are produced; the rest stay None."""
    moe = make_moe()
    for p in moe.experts.parameters():
        p.requires_grad_(False)
    x = torch.randn(31, moe.hidden_size)
    moe(x).sum().backward()
    assert all(p.grad is None for p in moe.experts.parameters())
    assert moe.gate.weight.grad is not None and moe.shared_experts.gate_proj.weight.grad is not None


# ---- the correction bias selects, it does not weight --------------------------------------------

def test_huge_bias_forces_the_choice_but_not_the_weight():
    j = 7
    moe = make_moe(bias_std=0.0, norm_topk_prob=True)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[j] = 1e3
    x = torch.randn(50, moe.hidden_size)
    r = moe.gate(x)
    assert (r.topk_idx == j).any(dim=-1).all()
    scores = torch.sigmoid(x @ moe.gate.weight.t())  # [N, E] unbiased
    chosen = scores.gather(1, r.topk_idx)
    share_j = scores[:, j] / chosen.sum(-1) * moe.gate.routed_scaling_factor
    w_j = (r.topk_weight * (r.topk_idx == j)).sum(-1)
    assert torch.allclose(w_j, share_j, atol=1e-6)
    assert (w_j < moe.gate.routed_scaling_factor * 0.9).all()  # far from "all weight on j"


# ---- aux-loss-free balancing --------------------------------------------------------------------

def skewed_moe(gamma: float) -> tuple[MoE, torch.Tensor]:
    """8 experts, top-2, whose gate rows 0 and 1 lean toward the tokens' common direction m
    (each keeps its own random part, so the two are not interchangeable for a token)."""
    torch.manual_seed(0)
    cfg = make_config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                      n_shared_experts=1, n_group=1, topk_group=1, bias_update_speed=gamma)
    moe = MoE(cfg, layer_idx=1)
    m = torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[:2] += 2.0 * m
    return moe, m


def max_over_mean(load: torch.Tensor) -> float:
    load = load.double()
    return (load.max() / load.mean()).item()


def test_bias_update_moves_a_skewed_router_toward_uniform():
    moe, m = skewed_moe(gamma=2e-2)
    torch.manual_seed(1)
    tokens = lambda n: torch.randn(n, 16) + 2 * m  # noqa: E731

    def load_ratio():  # over 4096 fresh tokens, so sampling noise does not decide the test
        moe.eval()
        with torch.no_grad():
            moe(tokens(4096))
        moe.train()
        return max_over_mean(moe.last_load)

    start = load_ratio()
    for step in range(100):  # a forward of 256 tokens, then the bias step, as after optimizer.step()
        if step == 60:
            moe.bias_update_speed = 2e-3  # DeepSeek-V3 also lowered gamma late in training
        with torch.no_grad():
            moe(tokens(256))
        moe.update_bias()
    end = load_ratio()
    assert start > 3.0 and end < 1.5, (start, end)
    bias = moe.gate.e_score_correction_bias
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down
    assert moe_load_stats(moe)["moe/layer1/max_load_ratio"] == pytest.approx(end)


def test_bias_update_step_and_bookkeeping():
    moe, m = skewed_moe(gamma=0.25)
    torch.manual_seed(2)
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(64, 16) + m)
    moe.update_bias()  # eval forwards are not counted: nothing to do
    assert moe.gate.e_score_correction_bias.abs().max() == 0
    moe.train()
    loads = []
    for _ in range(2):  # loads accumulate over micro-batches until the update
        with torch.no_grad():
            moe(torch.randn(64, 16) + m)
        loads.append(moe.last_load.clone())
    total = (loads[0] + loads[1]).double()
    update_moe_biases(torch.nn.ModuleList([moe]))
    assert torch.equal(moe.gate.e_score_correction_bias, 0.25 * torch.sign(total.mean() - total).float())
    before = moe.gate.e_score_correction_bias.clone()
    moe.update_bias()  # counts were reset: no step
    assert torch.equal(moe.gate.e_score_correction_bias, before)


def test_zero_speed_leaves_bias_alone():
    moe, m = skewed_moe(gamma=0.0)
    moe.train()
    moe(torch.randn(64, 16) + m)
    moe.update_bias()
    assert moe.gate.e_score_correction_bias.abs().max() == 0


WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from runtime.distributed import init_distributed, teardown
    from model.config import ModelConfig
    from model.moe import MoE, update_moe_biases
    info = init_distributed(backend="gloo")
    try:
        torch.manual_seed(0)  # same weights on both ranks
        cfg = ModelConfig(model_type="deepseek_v3", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
                          v_head_dim=8, hidden_size=16, n_routed_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=8, n_shared_experts=0, bias_update_speed=0.125)
        model = torch.nn.ModuleList([MoE(cfg, layer_idx=0), MoE(cfg, layer_idx=1)]).train()
        for moe in model:
            with torch.no_grad():
                moe.gate.weight.normal_(0, 1.0)
        torch.manual_seed(100 + info.rank)  # different tokens per rank
        x = torch.randn(40 + 24 * info.rank, 16) + 2.0 * info.rank
        with torch.no_grad():
            model[1](model[0](x))
        local = [moe.last_load.tolist() for moe in model]
        update_moe_biases(model)
        with open(f"{sys.argv[1]}.rank{info.rank}.json", "w") as f:
            json.dump({"local": local, "bias": [moe.gate.e_score_correction_bias.tolist() for moe in model]}, f)
    finally:
        teardown()
""")


@pytest.mark.distributed
def test_bias_update_all_reduces_loads_across_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "moe"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert recs[0]["bias"] == recs[1]["bias"]
    local_only_differs = False
    for layer in (0, 1):
        total = torch.tensor(recs[0]["local"][layer], dtype=torch.float64) + torch.tensor(recs[1]["local"][layer])
        expected = 0.125 * torch.sign(total.mean() - total)
        assert torch.equal(torch.tensor(recs[0]["bias"][layer], dtype=torch.float64), expected)
        for r in (0, 1):
            own = torch.tensor(recs[r]["local"][layer], dtype=torch.float64)
            local_only_differs |= not torch.equal(0.125 * torch.sign(own.mean() - own), expected)
    assert local_only_differs  # the summed loads, not a rank's own, decided the step


def test_model_level_helpers_on_the_tiny_moe_transformer():
    """update_moe_biases / moe_load_stats find the MoE layers inside a whole model (preset tiny-moe:
    layer 0 dense, layers 1-2 MoE, the MTP module's MoE at index 3, which a plain forward skips)."""
    from model import Transformer

    cfg = ModelConfig.from_preset("tiny-moe")
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model(torch.randint(0, cfg.vocab_size, (2, 16)))
    stats = moe_load_stats(model)
    assert set(stats) == {"moe/layer1/max_load_ratio", "moe/layer2/max_load_ratio", "moe/imbalance"}
    update_moe_biases(model)
    moved = {m.layer_idx: m.gate.e_score_correction_bias.abs().max().item()
             for m in model.modules() if isinstance(m, MoE)}
    assert moved[1] == moved[2] == pytest.approx(cfg.bias_update_speed) and moved[3] == 0


# ---- sequence-wise balance loss -----------------------------------------------------------------

def test_balance_loss_by_hand():
    # one sequence, T=3 tokens, E=4 experts, K=2 (each row of scores sums to 2)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5],
                           [0.2, 0.8, 0.6, 0.4],
                           [0.7, 0.3, 0.3, 0.7]], dtype=torch.float64)
    topk = torch.tensor([[0, 2], [1, 2], [0, 3]])
    # f = E/(K·T)·counts = 4/6·[2, 1, 2, 1];  P = mean of s/Σs = [0.3, 0.2, 0.7/3, 0.8/3]
    # Σ f·P = 4/3·0.3 + 2/3·0.2 + 4/3·0.7/3 + 2/3·0.8/3 = 46/45
    assert sequence_balance_loss(scores, topk, 1, alpha=0.1).item() == pytest.approx(0.1 * 46 / 45, abs=1e-12)
    # a second, perfectly balanced sequence (Σ f·P = 1) is averaged in per sequence
    balanced = torch.full((3, 4), 0.5, dtype=torch.float64)
    both = sequence_balance_loss(torch.cat([scores, balanced]), torch.cat([topk, torch.tensor([[0, 1], [2, 3], [0, 1]])]),
                                 2, alpha=0.1)
    # f for the balanced sequence is 4/6·[2, 2, 1, 1], P = 1/4 each: Σ f·P = 4/6·6/4 = 1
    assert both.item() == pytest.approx(0.1 * (46 / 45 + 1) / 2, abs=1e-12)
    s = scores.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sequence_balance_loss(t, topk, 1, alpha=0.1), (s,))


def test_aux_loss_after_training_forward_and_model_sum():
    layers = torch.nn.ModuleList([make_moe(seed=1, aux_loss_alpha=0.01), make_moe(seed=2, aux_loss_alpha=0.01)])
    x = torch.randn(2, 9, SIZES["hidden_size"])
    layers.eval()
    for moe in layers:
        moe(x)
    assert all(moe.aux_loss is None for moe in layers) and moe_aux_loss(layers) is None
    layers.train()
    for moe in layers:
        moe(x)
    for moe in layers:  # per sequence of the [B, T, D] input
        r = moe.gate(x.view(-1, moe.hidden_size))
        assert torch.allclose(moe.aux_loss, sequence_balance_loss(r.scores, r.topk_idx, 2, 0.01))
    total = moe_aux_loss(layers)
    assert torch.allclose(total, layers[0].aux_loss + layers[1].aux_loss)
    total.backward()
    assert layers[0].gate.weight.grad.abs().max() > 0
    off = make_moe(aux_loss_alpha=0.0).train()
    off(x)
    assert off.aux_loss is None and moe_aux_loss(off) is None  # alpha 0: no balance loss even in training


# ---- statistics, dtypes, names, errors ----------------------------------------------------------

def test_load_stats():
    layers = torch.nn.ModuleList([make_moe(seed=1), make_moe(seed=2)])
    layers[1].layer_idx = 4
    assert moe_load_stats(layers) == {}
    x = torch.randn(50, SIZES["hidden_size"])
    for moe in layers:
        moe(x)
    stats = moe_load_stats(layers)
    for moe in layers:
        assert moe.last_load.sum() == 50 * SIZES["num_experts_per_tok"]
    r3, r4 = max_over_mean(layers[0].last_load), max_over_mean(layers[1].last_load)
    assert stats == pytest.approx({"moe/layer3/max_load_ratio": r3, "moe/layer4/max_load_ratio": r4,
                                   "moe/imbalance": (r3 + r4) / 2})


def test_router_stays_fp32_when_the_model_is_cast_to_bf16():
    moe = make_moe().to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts[0].gate_proj.weight.dtype == torch.bfloat16
    x = torch.randn(2, 5, SIZES["hidden_size"], dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    ref = make_moe()(x.float())
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not lower the router either
        assert moe.gate(x.view(-1, SIZES["hidden_size"]).float()).scores.dtype == torch.float32


def test_state_dict_uses_checkpoint_names():
    moe = make_moe()
    keys = set(moe.state_dict())
    assert {"gate.weight", "gate.e_score_correction_bias", "experts.0.gate_proj.weight", "experts.11.down_proj.weight",
            "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
            "shared_experts.down_proj.weight"} <= keys
    assert len(keys) == 2 + 3 * SIZES["n_routed_experts"] + 3
    assert moe.shared_experts.gate_proj.weight.shape == (2 * 19, 37)  # n_shared · I
    assert MoE(make_config(n_shared_experts=0)).shared_experts is None


def test_meta_construction_and_reset():
    with torch.device("meta"):
        moe = MoE(make_config())
    assert moe.gate.weight.is_meta
    moe = moe.to_empty(device="cpu")
    moe.gate.reset_parameters()
    assert moe.gate.e_score_correction_bias.abs().max() == 0 and moe.gate.weight.std() > 0


def test_errors_name_the_layer_and_the_shape():
    moe = make_moe()
    with pytest.raises(ValueError, match=r"MoE \(layer 3\).*\[B, T, 37\]"):
        moe(torch.randn(4, 36))
    with pytest.raises(ValueError, match="n_routed_experts > 0"):
        MoE(make_config(n_routed_experts=0), layer_idx=0)
    with pytest.raises(ValueError, match=r"Router: expected input \[N, 37\]"):
        Router(make_config())(torch.randn(2, 3, 37))
    with pytest.raises(ValueError, match="do not split into 2 sequences"):
        sequence_balance_loss(torch.rand(5, 4), torch.zeros(5, 2, dtype=torch.long), 2, 0.1)


# ---- Qwen3-MoE's settings of the layer ------------------------------------------------------------

def test_qwen3_moe_switch_loss_equals_transformers_per_layer_and_averages_over_layers():
    """With output_router_logits, each Qwen3-MoE layer's training forward leaves the Switch balance
    loss of its own tokens: E Σ_i f_i P_i as transformers' load_balancing_loss_func computes it for
    that layer's router logits, times router_aux_loss_coef / the number of MoE layers (so the model
    sum is the coefficient times the layers' mean); it is differentiable through the router; the
    router of a bf16 model stays fp32; nothing is computed in eval mode or without the flag."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from model.transformer import Transformer
    from tests.model.conftest import randomize_, tiny_config

    config = tiny_config("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.05)
    model = randomize_(Transformer(config), 3).train()
    logits = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: logits.__setitem__(i, args[0].float() @ mod.weight.T))
        for i, layer in enumerate(model.layers) if config.is_moe_layer(i)]
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    model(ids)
    for h in hooks:
        h.remove()
    assert sorted(logits) == [0, 2]
    per_layer = {i: float(load_balancing_loss_func((lg.detach(),), config.n_routed_experts, config.num_experts_per_tok))
                 for i, lg in logits.items()}
    for i in logits:
        got = model.layers[i].mlp.aux_loss
        assert abs(float(got) - 0.05 / 2 * per_layer[i]) < 1e-6, (i, float(got), per_layer[i])
    total = moe_aux_loss(model)
    assert abs(float(total) - 0.05 * sum(per_layer.values()) / 2) < 1e-6
    total.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    model(ids)
    assert moe_aux_loss(model) is None
    off = Transformer(tiny_config("qwen3_moe", router_aux_loss_coef=0.05)).train()   # output_router_logits off
    off(ids)
    assert moe_aux_loss(off) is None
    bf16 = Transformer(config).to(torch.bfloat16)
    assert bf16.layers[0].mlp.gate.weight.dtype == torch.float32
    assert bf16.layers[0].mlp.gate.e_score_correction_bias is None
