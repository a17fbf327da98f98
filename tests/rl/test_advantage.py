"""rl.advantage: GRPO / batch-std / Dr. GRPO / RLOO advantages against numbers worked out by hand."""
import math

import pytest
import torch

from rl.advantage import ESTIMATORS, SCALES, STD_EPS, group_advantages, group_reward_stats

NAN = float("nan")
# two prompts, G = 4: group 1 has mean 0.5, group 2 mean 0.75
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-12)


def test_group_scale_by_hand():
    # group 1: deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = sqrt(1/3)
    # group 2: deviations 0.25 x3, -0.75; var = (3 * 0.0625 + 0.5625) / 3 = 0.25, std = 0.5
    s1, s2 = math.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    close(group_advantages(REWARDS, 4), [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1,
                                         0.25 / s2, 0.25 / s2, 0.25 / s2, -0.75 / s2])
    assert STD_EPS == 1e-4


def test_batch_scale_by_hand():
    # all 8 rewards: mean 5/8, deviations 0.375 (x5) and -0.625 (x3): sum of squares 1.875, var 1.875 / 7
    s = math.sqrt(1.875 / 7) + 1e-4
    close(group_advantages(REWARDS, 4, scale="batch"), [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s,
                                                        0.25 / s, 0.25 / s, 0.25 / s, -0.75 / s])


def test_no_scale_is_dr_grpo_centring():
    close(group_advantages(REWARDS, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_rloo_by_hand():
    # r_i minus the mean of the other three: group 1: 1 - 1/3, 0 - 2/3; group 2: 1 - 2/3, 0 - 1
    close(group_advantages(REWARDS, 4, scale="none", estimator="rloo"),
          [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0])


def test_rloo_is_n_over_n_minus_1_times_grpo_centring():
    r = torch.randn(6 * 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, 5, scale="none", estimator="rloo"),
                               group_advantages(r, 5, scale="none") * 5 / 4)


def test_none_rewards_are_left_out_and_get_zero():
    r = torch.tensor([1.0, NAN, 0.0, 1.0,      # 3 valid: mean 2/3, deviations 1/3, -2/3, 1/3, var (6/9)/2 = 1/3
                      NAN, NAN, 1.0, NAN,      # one valid reward: nothing to compare with -> zeros
                      NAN, NAN, NAN, NAN,      # all None -> zeros
                      0.5, 0.5, 0.5, 0.5],     # all equal: std 0 -> zeros, not NaN
                     dtype=torch.float64)
    s = math.sqrt(1 / 3) + 1e-4
    close(group_advantages(r, 4), [1 / 3 / s, 0.0, -2 / 3 / s, 1 / 3 / s] + [0.0] * 12)
    close(group_advantages(r, 4, scale="none", estimator="rloo"), [0.5, 0.0, -1.0, 0.5] + [0.0] * 12)
    # batch std over the 8 valid rewards 1, 0, 1, 1, 0.5 x4: mean 5/8, squares 3 * 0.140625 + 0.390625 + 4 * 0.015625
    sb = math.sqrt((3 * 0.140625 + 0.390625 + 4 * 0.015625) / 7) + 1e-4
    close(group_advantages(r, 4, scale="batch"), [1 / 3 / sb, 0.0, -2 / 3 / sb, 1 / 3 / sb] + [0.0] * 12)


def test_group_size_one_and_empty_give_zeros():
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 3.0]), 1), torch.zeros(3))
    assert group_advantages(torch.zeros(0), 4).shape == (0,)


def test_dtype_kept_and_float32_matches_float64():
    r = torch.rand(4 * 8, generator=torch.Generator().manual_seed(1))
    for scale in SCALES:
        for est in ESTIMATORS:
            a32 = group_advantages(r, 8, scale, estimator=est)
            assert a32.dtype == torch.float32
            torch.testing.assert_close(a32.double(), group_advantages(r.double(), 8, scale, estimator=est),
                                       rtol=1e-5, atol=1e-6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="scale='global'; expected one of group, batch, none"):
        group_advantages(REWARDS, 4, scale="global")
    with pytest.raises(ValueError, match="estimator='ppo'; expected one of grpo, rloo"):
        group_advantages(REWARDS, 4, estimator="ppo")
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="1-D float tensor"):
        group_advantages(REWARDS.view(2, 4), 4)
    with pytest.raises(ValueError, match="1-D float tensor"):
        group_advantages(torch.tensor([1, 0]), 2)
    with pytest.raises(ValueError, match="positive int"):
        group_advantages(REWARDS, 0)
    with pytest.raises(ValueError, match="inf"):
        group_advantages(torch.tensor([1.0, math.inf]), 2)


def test_group_reward_stats_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0,  0.5, 0.5, NAN, 0.5,  NAN, 1.0, NAN, NAN])
    stats = group_reward_stats(r, 4)
    valid = [1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0]                    # mean 5.5 / 8
    mean = 5.5 / 8
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / 7)
    assert stats["reward/mean"] == pytest.approx(mean, abs=1e-12)
    assert stats["reward/std"] == pytest.approx(std, abs=1e-7)
    assert stats["frac_none"] == pytest.approx(4 / 12)
    assert stats["frac_groups_zero_std"] == pytest.approx(2 / 3)    # the equal group and the one-valid group
    assert all(isinstance(v, float) for v in stats.values())
