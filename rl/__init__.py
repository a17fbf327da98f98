"""GRPO as DeepSeek ran it and the variants that followed (DAPO, Dr. GRPO, GSPO).

    rl.advantage   group_advantages (group / batch / no std scaling, RLOO; None rewards excluded),
                   group_reward_stats
    rl.loss        policy_loss: the clipped surrogate (clip-higher, dual clip), KL k1/k2/k3, token-mean /
                   seq-mean-token-mean / Dr. GRPO / bnpo aggregation, GSPO sequence ratio, entropy bonus,
                   truncated importance sampling; VARIANTS holds each paper's option set
    rl.rollout     prompts -> chat template -> sampler (n = group size) -> rewards
    rl.loop        train_grpo: the RL loop (torchrun train.py --stage grpo)
"""
