"""Reward functions and verifiers: math answers (sympy), format and tags, language, length, repetition, the synthetic tasks' checkers, and a sandbox for model-written code. Imports no torch and no other package of this project.

Not built yet: the verify issue adds verify.math, verify.rewards and verify.code here.
"""
