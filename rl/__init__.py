"""GRPO: rollouts, group advantages, the loss and its variants (DAPO, Dr. GRPO, GSPO), the RL loop.

Not built yet: the GRPO issue adds rl.advantage, rl.loss, rl.rollout and rl.loop here.
"""
