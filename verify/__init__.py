"""Reward functions and verifiers. Imports no torch and no other package of this project, so rewards
run cheaply in worker processes.

    verify.math      extract_answer, gold_answer, is_equivalent, verify: math answers compared on
                     sympy (a LaTeX normaliser and parser of our own in verify.latex), every call
                     time-limited; a gold of several differing boxes is one ordered answer
    verify.rewards   REWARDS: accuracy, format, think_format, tag_count, reasoning_steps, length,
                     cosine, repetition, soft_overlong, language, code, arithmetic, countdown, task;
                     get_reward("accuracy:1.0,format:0.5") for weighted sums (TRL's signature)
    verify.tasks     checkers of the synthetic tasks (no eval of model text)
    verify.pool      RewardPool: long-lived worker processes, per-item timeouts, hung workers replaced
    verify.code      run_tests: a sandbox for model-written Python (namespaces, unprivileged user,
                     cgroups, rlimits; the verdict decided outside the untrusted process) against
                     HumanEval tests, calls, stdin/stdout cases or assert statements (MBPP)
    verify.openai_client  OpenAIClient: an OpenAI-compatible HTTP client for remote teachers and LLM
                     judges (timeouts, retries with back-off, a concurrency limit, a disk cache),
                     standard library only
    verify.judge     LLM judges as rewards (--reward judge:FILE | judge:equivalence): a prompt template
                     and a verdict or score rule, None when the judge fails or does not parse
    python -m verify score --data FILE.jsonl --reward accuracy,format   mean of each reward
"""
