"""The GRPO policy loss and its variants (DAPO, Dr. GRPO, GSPO, dual clip, TIS) as one pure function,
and how its metrics combine over the micro-batches and ranks of an optimizer step.

The per-token formula lives in kernels.grpo_token_loss (PPO clip with eps_low/eps_high, dual clip,
KL estimators k1/k2/k3 weighted by beta, importance-sampling weight). This file builds the log-ratio
it is given (per token, or GSPO's per sequence), the importance weight, and aggregates the per-token
losses l_it over tokens and sequences. Letters: B sequences (completions) in this call, T token
positions, m_it the completion mask, |o_i| = sum_t m_it, A_i the advantage of sequence i.

    r_it = exp(logp_it - old_logp_it)                                       ratio_level="token"
    l_it = m_it * (w_it * pg(r_it, A_i) + beta * kl_it)                     kernels.grpo_token_loss

Aggregations (N = num_tokens or this call's sum m_it; S = num_seqs or B):

    token_mean                sum_it l_it / N                               DAPO (Yu et al. 2025), token-level
    seq_mean_token_mean       sum_i (sum_t l_it / |o_i|) / S                GRPO (DeepSeekMath, Shao et al. 2024)
    seq_mean_token_sum_norm   sum_it l_it / (S * max_tokens)                Dr. GRPO (Liu et al. 2025)
    bnpo                      sum_it l_it / (this call's sum m_it)          TRL's "bnpo"

The paper variants as option sets (VARIANTS below holds them, with the advantage options that go
with each):

    GRPO, as DeepSeekMath ran it: agg="seq_mean_token_mean", beta=0.04, kl="k3", eps 0.2 both sides,
        advantages scale="group". (DeepSeekMath also takes a single policy update per rollout batch,
        so old_logp == logp.detach() and the ratio is 1 in value; the clip never binds.)
    DAPO (Yu et al. 2025): agg="token_mean", eps_low=0.2, eps_high=0.28 ("clip-higher"), beta=0;
        its dynamic sampling (drop groups whose rewards are all equal, see
        rl.advantage.group_reward_stats) and overlong reward shaping belong to the loop and verify/.
    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): agg="seq_mean_token_sum_norm"
        with max_tokens = the generation budget, advantages scale="none", beta=0.
    GSPO (Zheng et al. 2025): ratio_level="sequence", agg="seq_mean_token_mean", eps_low=3e-4,
        eps_high=4e-4 (the paper's ranges, section 5.1 of v2: a sequence ratio is a geometric mean of
        token ratios, so it sits much closer to 1 and needs a far narrower clip), beta=0. Like every
        ratio, it only departs from 1 once training is off-policy (several updates per rollout batch).
    Dual clip (Ye et al. 2020): dual_clip=c (e.g. 3.0) bounds the loss of negative-advantage tokens
        whose ratio exceeds c by -c * A.
    TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
        rollout_logp = the sampler's log-probs and is_cap = C, weight w = min(exp(old_logp - rollout_logp), C)
        on the policy term; or pass a ready is_weight.

GSPO's sequence ratio. s_i = exp(sum_t m_it (logp_it - old_logp_it) / |o_i|), and each token gets
log r_it = sg(log s_i) + logp_it - sg(logp_it) (sg = stop gradient): GSPO-token's form, equal to s_i in
value, with d r_it / d logp_it = s_i. With per-sequence advantages and seq_mean_token_mean this has
exactly GSPO's value and gradient, -(1/S) sum_i A_i s_i (1/|o_i|) sum_t grad logp_it where the clip
does not bind; the clip acts on s_i, so it keeps or drops whole sequences. With another agg it is the
paper's GSPO-token objective with that aggregation.

Departures and conventions:
- Defaults are DAPO's token_mean (TRL's loss_type="dapo") with beta=0 (TRL's default), not
  DeepSeekMath's seq_mean_token_mean with beta=0.04: pick a VARIANTS entry to reproduce a paper.
- The KL term is aggregated with the same agg as the policy term (as in DeepSeekMath's objective,
  where it sits inside the per-token sum), and the entropy bonus too (as verl does): loss -= entropy_coef
  * agg(entropy). No GRPO paper uses an entropy bonus; it is off unless entropy_coef != 0.
- bnpo always divides by its own call's token count, so with several micro-batches or ranks it weights
  each micro-batch equally rather than each token; token_mean with num_tokens = the step's global count
  is the exact DAPO token-level loss. With one micro-batch on one rank the two are equal.
- Empty sequences (|o_i| = 0) add 0 but still count in S, as in TRL. Counts of 0 divide as 1 (loss 0).
- The IS weight multiplies the policy term only, not the KL term, and carries no gradient; the
  log-ratio is clamped to [-20, 20] inside the kernel (see kernels/grpo_loss.py), and so is
  old_logp - rollout_logp before exp.
- Padding (mask 0) may hold any value, even -inf log-probs: it is zeroed before use.
- Only logp and entropy carry gradient; old_logp, ref_logp, rollout_logp, is_weight and advantages are
  detached here.

Gradient accumulation and data parallelism: with num_tokens / num_seqs set to the optimizer step's
totals (all micro-batches, all ranks), each call's loss is that micro-batch's share of the step loss,
so the gradients must be *summed* over micro-batches and ranks. DDP and FSDP average gradients over
ranks, so under them multiply the loss by the world size (or all-reduce with SUM yourself).
"""
import math

import torch

from kernels import grpo_token_loss
from runtime.distributed import all_reduce, get_world_size

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "bnpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
LOG_CLAMP = 20.0  # |log| bound of ratios and IS weights, as kernels/grpo_loss.py clamps the log-ratio
# How each metric of policy_loss combines over micro-batches and ranks; any other key is a token mean,
# combined weighted by "tokens".
METRIC_REDUCTIONS = {"loss": "sum", "pg_loss": "sum", "tokens": "sum", "ratio/min": "min", "ratio/max": "max"}

# Paper option sets: "loss" goes to policy_loss, "advantage" to rl.advantage.group_advantages.
# Dr. GRPO also needs max_tokens (the generation budget), which is a run setting, not a paper constant.
VARIANTS = {
    "grpo": {"loss": dict(agg="seq_mean_token_mean", eps_low=0.2, eps_high=0.2, beta=0.04, kl="k3"),
             "advantage": dict(scale="group", estimator="grpo")},
    "dapo": {"loss": dict(agg="token_mean", eps_low=0.2, eps_high=0.28, beta=0.0),
             "advantage": dict(scale="group", estimator="grpo")},
    "dr_grpo": {"loss": dict(agg="seq_mean_token_sum_norm", eps_low=0.2, eps_high=0.2, beta=0.0),
                "advantage": dict(scale="none", estimator="grpo")},
    "gspo": {"loss": dict(agg="seq_mean_token_mean", ratio_level="sequence", eps_low=3e-4, eps_high=4e-4,
                          beta=0.0),
             "advantage": dict(scale="group", estimator="grpo")},
}


def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, entropy, is_weight, rollout_logp) -> None:
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"rl.loss.policy_loss: logp must be a float tensor [B, T], got "
                         f"{_shape(logp) if isinstance(logp, torch.Tensor) else type(logp)}")
    shape = _shape(logp)
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("entropy", entropy),
                    ("rollout_logp", rollout_logp)):
        if t is not None and _shape(t) != shape:
            raise ValueError(f"rl.loss.policy_loss: {name} has shape {_shape(t)}; expected logp's shape [B, T] = {shape}")
    if _shape(advantages) not in (shape[:1], shape):
        raise ValueError(f"rl.loss.policy_loss: advantages has shape {_shape(advantages)}; expected one per "
                         f"sequence, [B] = {shape[:1]}, or one per token, [B, T] = {shape}")
    if is_weight is not None and _shape(is_weight) not in (shape, shape[:1]):
        raise ValueError(f"rl.loss.policy_loss: is_weight has shape {_shape(is_weight)}; expected [B, T] = {shape} "
                         f"or [B] = {shape[:1]}")


def _check_count(name, value) -> None:
    """num_tokens / num_seqs / max_tokens: a positive number, or a tensor (not checked: no device sync)."""
    if value is None or isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"rl.loss.policy_loss: {name} must be a positive number (or None), got {value!r}")


def _check_options(agg, kl, ratio_level, beta, ref_logp, max_tokens, num_tokens, num_seqs, entropy, entropy_coef,
                   is_weight, rollout_logp, is_cap) -> None:
    for name, value, allowed in (("agg", agg, AGGREGATIONS), ("kl", kl, KL_ESTIMATORS),
                                 ("ratio_level", ratio_level, RATIO_LEVELS)):
        if value not in allowed:
            raise ValueError(f"rl.loss.policy_loss: {name}={value!r}; expected one of {', '.join(allowed)}")
    if not beta >= 0:
        raise ValueError(f"rl.loss.policy_loss: beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"rl.loss.policy_loss: beta={beta} needs ref_logp (the reference model's log-probs)")
    if agg == "seq_mean_token_sum_norm" and max_tokens is None:
        raise ValueError("rl.loss.policy_loss: agg='seq_mean_token_sum_norm' (Dr. GRPO) needs max_tokens, "
                         "the generation budget it divides by")
    for name, value in (("max_tokens", max_tokens), ("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        _check_count(name, value)
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"rl.loss.policy_loss: entropy_coef={entropy_coef} needs entropy [B, T]")
    if is_weight is not None and rollout_logp is not None:
        raise ValueError("rl.loss.policy_loss: pass is_weight or rollout_logp, not both")
    if is_cap is not None:
        if is_weight is None and rollout_logp is None:
            raise ValueError("rl.loss.policy_loss: is_cap needs rollout_logp (or is_weight) to cap")
        if not is_cap > 0:
            raise ValueError(f"rl.loss.policy_loss: is_cap must be > 0, got {is_cap}")


def _zero_padding(t, live):
    """t [B, T] with 0 where the mask is 0. Padding may hold anything (even -inf log-probs); zeroing it keeps
    inf - inf and 0 * inf out of every sum. where() passes the gradient on live tokens and 0 elsewhere."""
    return None if t is None else torch.where(live, t, torch.zeros_like(t))


def _log_ratio(logp, old_logp, m, ratio_level):
    """Per-token log-ratio [B, T]: token-level, or GSPO's sequence log-ratio with the stop-gradient trick."""
    token_lr = logp - old_logp                                      # [B, T]
    if ratio_level == "token":
        return token_lr
    seq_lr = (token_lr.detach().float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # [B] log s_i, fp32
    # value: log s_i on every token; gradient: d/d logp_it of (log s_i + logp_it - sg(logp_it)) = 1 per token,
    # so d r_it / d logp_it = s_i (GSPO-token, Zheng et al. 2025)
    return seq_lr[:, None] + logp - logp.detach()                   # [B, T]


def _aggregate(x, m, agg, max_tokens, num_tokens, num_seqs):
    """Aggregate per-token values x [B, T] (already multiplied by m) into a 0-dim tensor, per `agg`."""
    if agg == "bnpo":
        return x.sum() / m.sum().clamp(min=1)
    if agg == "token_mean":
        return x.sum() / (m.sum().clamp(min=1) if num_tokens is None else num_tokens)
    seqs = max(x.shape[0], 1) if num_seqs is None else num_seqs
    if agg == "seq_mean_token_mean":
        per_seq = x.sum(dim=1) / m.sum(dim=1).clamp(min=1)         # [B]
        return per_seq.sum() / seqs
    return x.sum() / (seqs * max_tokens)                            # seq_mean_token_sum_norm


def _weighted_mean(x, m, tokens):
    """Token mean of x [B, T] over the mask (weighted by m when it holds weights)."""
    return (x * m).sum() / tokens.clamp(min=1)


def policy_loss(logp, old_logp, advantages, mask, ref_logp=None, *, eps_low=0.2, eps_high=0.2, beta=0.0, kl="k3",
                agg="token_mean", max_tokens=None, ratio_level="token", num_tokens=None, num_seqs=None,
                dual_clip=None, entropy=None, entropy_coef=0.0, is_weight=None, rollout_logp=None, is_cap=None):
    """The clipped policy-gradient loss of one (micro-)batch of completions, aggregated per `agg`.

    Inputs ([B, T] is completions x token positions; formulas and normalisers in the module docstring):
      logp [B, T]          log pi_theta of the sampled tokens (differentiable)
      old_logp [B, T]      log pi_old at sampling time; None means logp.detach() (one update per batch)
      advantages [B]       one per completion (rl.advantage.group_advantages), or [B, T] one per
                           token (on-policy distillation's per-token reverse KL: rl/distill.py)
      mask [B, T]          1 on completion tokens to train on (bool or float weights)
      ref_logp [B, T]      reference model log-probs for the KL term (needed when beta > 0)
      eps_low, eps_high    clip range [1 - eps_low, 1 + eps_high] of the ratio
      beta, kl             KL weight and estimator (k1, k2, k3; DeepSeekMath uses k3)
      agg                  one of AGGREGATIONS; max_tokens: Dr. GRPO's constant (seq_mean_token_sum_norm)
      ratio_level          "token" (PPO/GRPO) or "sequence" (GSPO)
      num_tokens, num_seqs the optimizer step's totals over micro-batches and ranks (int, float or a
                           0-dim tensor, e.g. an all-reduced count); None = this call's own counts
      dual_clip            c > 1 + eps_high or None
      entropy [B, T]       per-token entropy (differentiable); loss -= entropy_coef * agg(entropy)
      is_weight [B, T]|[B] importance weight of the policy term, or rollout_logp [B, T] to compute
                           w = exp(old_logp - rollout_logp); is_cap caps either: w = min(w, is_cap) (TIS)

    Returns (loss, metrics): loss a 0-dim fp32 tensor with gradient. metrics: detached 0-dim fp32 tensors
    on logp's device (no host sync per micro-batch), all over this call's masked tokens; combine_metrics
    merges the micro-batches of a step and all_reduce_metrics the ranks (METRIC_REDUCTIONS says how):
      loss, pg_loss          the total and the policy term alone (with w, without KL/entropy), both
                             aggregated per agg; with global num_tokens/num_seqs these add up (sum) over
                             micro-batches and ranks to the step's value
      tokens                 this call's token count sum m_it: the weight for averaging the means below
      clip_ratio/low, /high, /dual, clip_ratio (their sum): share of tokens whose clip branch binds
      ratio/mean             token mean of r (GSPO: of s_i repeated over each sequence's tokens)
      ratio/min, ratio/max   over masked tokens; +inf / -inf when there are none (identities of min/max)
      kl                     token mean of the KL estimate (when ref_logp is given)
      entropy                token mean (when entropy is given)
      is_weight/mean         token mean of the importance weight (when one is used)
    """
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, entropy, is_weight, rollout_logp)
    _check_options(agg, kl, ratio_level, beta, ref_logp, max_tokens, num_tokens, num_seqs, entropy, entropy_coef,
                   is_weight, rollout_logp, is_cap)
    m = mask.to(torch.float32)                                      # [B, T]
    live = m != 0
    logp, entropy = _zero_padding(logp, live), _zero_padding(entropy, live)
    old_logp = logp.detach() if old_logp is None else _zero_padding(old_logp.detach(), live)
    ref_logp = None if ref_logp is None else _zero_padding(ref_logp.detach(), live)
    rollout_logp = None if rollout_logp is None else _zero_padding(rollout_logp.detach(), live)
    log_ratio = _log_ratio(logp, old_logp, m, ratio_level)         # [B, T]

    w = None                                                        # [B, T] or [B], no gradient
    if rollout_logp is not None:
        w = torch.exp((old_logp.float() - rollout_logp.detach().float()).clamp(-LOG_CLAMP, LOG_CLAMP))
    elif is_weight is not None:
        w = is_weight.detach().float()
    if w is not None and is_cap is not None:
        w = w.clamp(max=is_cap)

    out = grpo_token_loss(log_ratio, advantages.detach(), m, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                          beta=beta, logp=None if ref_logp is None else logp, ref_logp=ref_logp, kl_estimator=kl,
                          is_weight=w)                              # per-token, each [B, T]

    def aggregate(x):
        return _aggregate(x, m, agg, max_tokens, num_tokens, num_seqs)

    loss = aggregate(out.loss)                                      # policy term + beta * KL term
    pg_loss = loss.detach()
    if ref_logp is not None:                                        # out.kl is 0 off the mask, not m-weighted
        pg_loss = pg_loss - beta * aggregate(out.kl * m)
    if entropy is not None and entropy_coef != 0:
        loss = loss - entropy_coef * aggregate(entropy.float() * m)

    with torch.no_grad():
        tokens = m.sum()
        r = torch.exp(log_ratio.detach().float().clamp(-LOG_CLAMP, LOG_CLAMP))  # [B, T]
        metrics = {
            "loss": loss.detach(),
            "pg_loss": pg_loss,
            "tokens": tokens,
            "clip_ratio/low": _weighted_mean(out.clipped_low, m, tokens),
            "clip_ratio/high": _weighted_mean(out.clipped_high, m, tokens),
            "clip_ratio/dual": _weighted_mean(out.clipped_dual, m, tokens),
            "ratio/mean": _weighted_mean(r, m, tokens),
            "ratio/min": torch.where(live, r, torch.full_like(r, math.inf)).amin() if r.numel() else r.new_tensor(math.inf),
            "ratio/max": torch.where(live, r, torch.full_like(r, -math.inf)).amax() if r.numel() else r.new_tensor(-math.inf),
        }
        metrics["clip_ratio"] = metrics["clip_ratio/low"] + metrics["clip_ratio/high"] + metrics["clip_ratio/dual"]
        if ref_logp is not None:
            metrics["kl"] = _weighted_mean(out.kl, m, tokens)
        if entropy is not None:
            metrics["entropy"] = _weighted_mean(entropy.detach().float(), m, tokens)
        if w is not None:
            metrics["is_weight/mean"] = _weighted_mean(w if w.dim() == 2 else w[:, None].expand_as(m), m, tokens)
    return loss, metrics


# ---------------------------------------------------------------- combining metrics of one optimizer step

def _reduction(name: str) -> str:
    return METRIC_REDUCTIONS.get(name, "token_mean")


def combine_metrics(parts: list[dict]) -> dict:
    """The metrics of several policy_loss calls (the micro-batches of one step) as those of one call over
    all their tokens: sums for loss, pg_loss and tokens (the step's loss when the calls were given the
    step's num_tokens / num_seqs), min / max for ratio/min / ratio/max, token-weighted means for the rest.
    All calls must report the same keys. Returns detached 0-dim tensors."""
    if not parts:
        raise ValueError("rl.loss.combine_metrics: no metrics to combine")
    keys = set(parts[0])
    for i, p in enumerate(parts):
        if set(p) != keys:
            raise ValueError(f"rl.loss.combine_metrics: part {i} has keys {sorted(p)}, part 0 {sorted(keys)}")
    counts = torch.stack([p["tokens"] for p in parts])              # [P]
    total = counts.sum()
    out = {}
    for k in keys:
        vals = torch.stack([p[k] for p in parts])                   # [P]
        how = _reduction(k)
        if how == "sum":
            out[k] = vals.sum()
        elif how == "min":
            out[k] = vals.amin()
        elif how == "max":
            out[k] = vals.amax()
        else:
            out[k] = (vals * counts).sum() / total.clamp(min=1)
    return out


def all_reduce_metrics(metrics: dict, group=None) -> dict:
    """combine_metrics across the ranks of `group` (every rank gets the result); a copy without a process
    group. Three collectives (SUM, MIN, MAX) whatever the number of metrics. Every rank must pass the same keys."""
    if get_world_size() == 1 and group is None:
        return dict(metrics)
    keys = sorted(metrics)
    tokens = metrics["tokens"]
    summed = [k for k in keys if _reduction(k) in ("sum", "token_mean")]
    # token means travel as token-weighted sums, divided by the global count after the reduction
    packed = torch.stack([metrics[k] if _reduction(k) == "sum" else metrics[k] * tokens for k in summed])
    all_reduce(packed, "sum", group)
    out = dict(zip(summed, packed.unbind()))
    total = out["tokens"].clamp(min=1)
    for k in summed:
        if _reduction(k) == "token_mean":
            out[k] = out[k] / total
    for how in ("min", "max"):
        names = [k for k in keys if _reduction(k) == how]
        if names:
            packed = torch.stack([metrics[k] for k in names])
            all_reduce(packed, how, group)
            out.update(zip(names, packed.unbind()))
    return out
