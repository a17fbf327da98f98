"""A rollout after an optimizer step samples from the updated adapters: the worker of tests/rl/test_lora.py.

    python tests/rl/_lora_worker.py OUT_DIR                      # one process, the model unsharded
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/rl/_lora_worker.py OUT_DIR

For a qwen2 and an MLA + MoE deepseek_v3 model (every linear layer adapted, kv_b_proj included,
whose weight MLA's absorbed decode reads directly) the worker takes one AdamW step on the adapters
(so B is no longer 0), then samples seeded completions the way rl/loop.py does: inside
TensorParallelRollout.weights() (gathered under FSDP2, and, on 2 ranks, also split over both by
tensor parallelism), and scores the same completions with the training forward (sequence_logprobs,
the adapters applied unmerged), and with the adapters switched off (the base). Each rank writes
OUT_DIR/rank{r}.json: per model and rollout mode, the largest |sampler - trainer| and
|sampler - base| log-prob gaps, and whether every parameter (this rank's shard) is bit for bit what
it was before the rollout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model import ModelConfig, Transformer  # noqa: E402
from model.lora import adapters_disabled, apply_lora, init_adapters, lora_parameters  # noqa: E402
from model.parallel import apply_fsdp, gathered  # noqa: E402
from model.tensor_parallel import TensorParallelRollout  # noqa: E402
from rl.loop import sequence_logprobs  # noqa: E402
from runtime.distributed import init_distributed, launched_by_torchrun, subgroup, teardown  # noqa: E402
from sampling import Sampler, SamplingParams  # noqa: E402
from tests.sampling.test_sampler import CONFIGS  # noqa: E402


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def main() -> int:
    out = Path(sys.argv[1])
    distributed = launched_by_torchrun()
    info = init_distributed() if distributed else None
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    result = {}
    for kind in ("qwen2", "deepseek_v3"):
        cfg = CONFIGS[kind]
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**cfg))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.3)
        apply_lora(model, None, rank=4, alpha=8)       # every linear layer this model has
        init_adapters(model, seed=0)
        if distributed:
            apply_fsdp(model)
        # one optimizer step on the adapters: the same sequence on every rank (the same update)
        opt = torch.optim.AdamW(lora_parameters(model) if not distributed else
                                [p for p in model.parameters() if p.requires_grad], lr=0.05)
        prompt, completion = [[3, 1, 4, 1, 5]], [[9, 2, 6, 5, 3, 5]]
        logp, _, _ = sequence_logprobs(model, prompt, completion, 1.0)
        (-logp.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        before = {n: _local(p) for n, p in model.named_parameters()}

        prompts = [[5 + rank, 6, 7], list(range(1, 12 + rank))]
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=11 + rank)
        for tp in ([1, 2] if world == 2 else [1]):
            rollout = TensorParallelRollout(model, subgroup(tp) if distributed else _one())
            with torch.no_grad(), rollout.weights() as policy:
                sampler = Sampler(policy, max_batch_size=8, max_seq_len=64)
                outs = sampler.generate(prompts, params)
                sampler.release()
            p_ids = [prompts[i] for i, group in enumerate(outs) for _ in group]
            c_ids = [list(c.token_ids) for group in outs for c in group]
            sampled = [list(c.logprobs) for group in outs for c in group]
            with torch.no_grad(), gathered(model):
                trained, _, mask = sequence_logprobs(model, p_ids, c_ids, 1.0)
                with adapters_disabled(model):
                    base, _, _ = sequence_logprobs(model, p_ids, c_ids, 1.0)
            s = torch.zeros_like(trained)
            for i, row in enumerate(sampled):
                s[i, :len(row)] = torch.tensor(row)
            unchanged = all(torch.equal(_local(p), before[n]) for n, p in model.named_parameters())
            result[f"{kind}/tp{tp}"] = {
                "vs_trainer": float(((s - trained).abs() * mask).max()),
                "vs_base": float(((s - base).abs() * mask).max()),
                "tokens": int(mask.sum()), "weights_unchanged": unchanged,
                "adapters_moved": any(float(_local(p).abs().max()) > 0 for n, p in model.named_parameters()
                                      if n.endswith("lora_B")),
            }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    if distributed:
        teardown()
    return 0


def _one():
    """The group of one rank TensorParallelRollout takes in a process without torch.distributed."""
    from runtime.distributed import Subgroup
    return Subgroup((0,), 0, 0)


if __name__ == "__main__":
    sys.exit(main())
