"""Group-relative advantages: GRPO's baseline, its scaling variants and RLOO, as pure functions.

A prompt is sampled G times (a group); each completion i gets a scalar reward r_i. With the mean and
standard deviation taken over the valid (non-None) rewards of the group:

    estimator="grpo"   c_i = r_i - mean_g(r)                              (DeepSeekMath, eq. for outcome supervision)
    estimator="rloo"   c_i = r_i - mean of the other valid rewards of the group
                           = n/(n-1) * (r_i - mean_g(r))                  (Ahmadian et al. 2024, "Back to Basics")

    scale="group"      A_i = c_i / (std_g(r) + eps)                       GRPO as DeepSeekMath and TRL run it
    scale="batch"      A_i = c_i / (std_batch(r) + eps)                   group mean, batch std (TRL scale_rewards="batch")
    scale="none"       A_i = c_i                                          Dr. GRPO (Liu et al. 2025): no std division

Conventions and departures from the papers:
- The standard deviation is the unbiased one (divisor n - 1), like torch.std's default, which is what
  TRL's GRPOTrainer uses; DeepSeekMath does not say which. eps = 1e-4 is added to the std (not to the
  variance), as TRL does, so a group whose rewards are all equal gets advantage 0, not NaN.
- scale="batch" divides by the std of all valid rewards passed in, keeping the per-group mean as the
  baseline; it is the "group mean, batch std" normalisation that Liu et al. 2025 ("Tricks or Traps",
  Lite PPO) recommend, and close to REINFORCE++'s global batch normalisation (which takes the std of
  the centred advantages instead). "The batch" is what the caller passes: under data parallelism,
  gather every rank's rewards first if the std should be the global one.
- Dr. GRPO's paper removes both the std division here and the per-sequence length normalisation in
  the loss: use scale="none" with policy_loss(agg="seq_mean_token_sum_norm") (rl.loss.VARIANTS).
- A reward of NaN means None ("no signal", a reward function that abstained, as in TRL): it gets
  advantage 0 and is left out of its group's mean and std (and of the batch std). A group with fewer
  than two valid rewards has no baseline to compare against: all its advantages are 0.
- Rewards arrive in group order: entries [k*G, (k+1)*G) are the G completions of prompt k.

Shapes: N = number of prompts * G; rewards [N] -> advantages [N], in the rewards' dtype.
"""
import torch

SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
STD_EPS = 1e-4


def _check_rewards(rewards: torch.Tensor, group_size: int) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        what = f"a {rewards.dim()}-D {rewards.dtype} tensor" if isinstance(rewards, torch.Tensor) else type(rewards)
        raise ValueError(f"rl.advantage: rewards must be a 1-D float tensor [num_prompts * group_size] "
                         f"(NaN for None), got {what}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"rl.advantage: group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rl.advantage: {rewards.numel()} rewards do not split into groups of {group_size}")
    if torch.isinf(rewards).any():
        raise ValueError("rl.advantage: rewards contain +-inf; use NaN for 'no reward' (None)")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", *, estimator: str = "grpo",
                     eps: float = STD_EPS) -> torch.Tensor:
    """Advantages of N = num_prompts * group_size completions from their rewards (formulas in the module docstring).

    rewards [N] float, NaN = None, grouped contiguously by prompt; scale in SCALES; estimator in
    ESTIMATORS; eps added to the std. Returns [N] in rewards' dtype, 0 for None rewards and for groups
    with fewer than two valid rewards. Carries no gradient (rewards are data).
    """
    if scale not in SCALES:
        raise ValueError(f"rl.advantage: scale={scale!r}; expected one of {', '.join(SCALES)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"rl.advantage: estimator={estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    _check_rewards(rewards, group_size)
    r = rewards.detach().view(-1, group_size)                      # [P, G]
    valid = ~torch.isnan(r)                                        # [P, G]
    r0 = torch.where(valid, r, torch.zeros_like(r))                # None -> 0, then masked out everywhere
    n = valid.sum(dim=1, keepdim=True).to(r.dtype)                 # [P, 1] valid members per group
    total = r0.sum(dim=1, keepdim=True)                            # [P, 1]
    mean = total / n.clamp(min=1)
    if estimator == "grpo":
        centred = r0 - mean
    else:  # rloo: baseline = mean of the other n - 1 valid members
        centred = r0 - (total - r0) / (n - 1).clamp(min=1)
    if scale == "group":
        sq = torch.where(valid, (r0 - mean) ** 2, torch.zeros_like(r0)).sum(dim=1, keepdim=True)
        std = (sq / (n - 1).clamp(min=1)).sqrt()                   # [P, 1] unbiased
        centred = centred / (std + eps)
    elif scale == "batch":
        flat = rewards.detach()[~torch.isnan(rewards)]
        std = flat.std() if flat.numel() >= 2 else flat.new_zeros(())
        centred = centred / (std + eps)
    keep = valid & (n >= 2)
    return torch.where(keep, centred, torch.zeros_like(centred)).reshape(-1)


def group_reward_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Per-batch figures of the reward groups, for logging and for DAPO's dynamic sampling.

    rewards [N] float, NaN = None, grouped as in group_advantages. Returns plain floats:
      reward/mean, reward/std   over the valid rewards (unbiased std; NaN when fewer than 1 / 2)
      frac_none                 share of rewards that are None
      frac_groups_zero_std      share of groups whose valid rewards are all equal or that have fewer than
                                two valid rewards: their advantages are all 0, so they add no policy
                                gradient (DAPO's dynamic sampling drops and resamples such groups)
    """
    _check_rewards(rewards, group_size)
    r = rewards.detach().double().view(-1, group_size)              # [P, G]
    valid = ~torch.isnan(r)
    flat = r[valid]
    n = valid.sum(dim=1)
    lo = torch.where(valid, r, torch.full_like(r, float("inf"))).amin(dim=1)
    hi = torch.where(valid, r, torch.full_like(r, float("-inf"))).amax(dim=1)
    flat_groups = (n < 2) | (lo == hi)
    nan = float("nan")
    return {
        "reward/mean": flat.mean().item() if flat.numel() else nan,
        "reward/std": flat.std().item() if flat.numel() >= 2 else nan,
        "frac_none": 1.0 - flat.numel() / max(r.numel(), 1),
        "frac_groups_zero_std": flat_groups.double().mean().item() if r.shape[0] else nan,
    }
