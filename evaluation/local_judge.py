"""An LLM judge in-process: `--reward judge:FILE --judge-model DIR` grades with a local checkpoint.

    chat = LocalChat(model, tok, max_len=4096)               # greedy, batched, on the rollout engine
    judge = JudgeReward("judge:equivalence", chat, "DIR")    # verify/judge.py: the same templates and rules
    judge(completions, prompts=..., answer=...)              # -> [1.0, 0.0, None, ...]

LocalChat answers verify.judge's requests the way an OpenAI-compatible endpoint would: it has the
client's `post_many("/chat/completions", bodies)`, renders each body's messages with the judge
checkpoint's chat template (the assistant turn opened), samples them all as one batch on a Sampler
(temperature and max_tokens from the body; the template's default is greedy), and returns
chat.completion-shaped answers. A prompt too long for the judge's context is that request's
failure (an exception in its place, which the judge counts as failed and scores None), so one long
completion never stops the batch. The judge model is frozen and in eval mode; on every rank of a
multi-rank run each rank holds its own copy (judges are small next to the policy; a judge too big
for that belongs behind --judge-url).
"""
from __future__ import annotations

from collections import Counter


class LocalChat:
    def __init__(self, model, tok, max_len: int | None = None, max_batch_size: int = 64, chat_template=None,
                 engine: dict | None = None):
        from sampling.sampler import Sampler
        self.model, self.tok = model.eval().requires_grad_(False), tok
        self.template = chat_template if chat_template is not None else tok.chat_template
        if self.template is None:
            raise ValueError("the judge model's tokenizer has no chat template")
        self.max_len = max_len or model.config.max_position_embeddings
        self.sampler = Sampler(self.model, max_batch_size=max_batch_size, max_seq_len=self.max_len, tokenizer=tok,
                               verbose=False, **(engine or {}))
        self.stats = Counter()

    def post_many(self, path: str, bodies: list[dict]) -> list:
        from data.chat import render
        from evaluation.eval_stage import completion_text
        from sampling.sampler import SamplingParams

        if path != "/chat/completions":
            raise ValueError(f"LocalChat serves /chat/completions only, got {path}")
        results: list = [None] * len(bodies)
        todo, prompts, params = [], [], []
        for i, body in enumerate(bodies):
            ids = self.tok.encode(render(body["messages"], self.template, add_generation_prompt=True,
                                         **self.tok.special_tokens))
            max_new = int(body.get("max_tokens") or 1024)
            if len(ids) + max_new > self.max_len:
                results[i] = ValueError(f"the judge prompt has {len(ids)} tokens; with max_tokens {max_new} it needs "
                                        f"{len(ids) + max_new} positions but the judge's context is {self.max_len}")
                continue
            todo.append(i)
            prompts.append(ids)
            params.append(SamplingParams(temperature=float(body.get("temperature", 0.0)), top_p=1.0,
                                         max_new_tokens=max_new, seed=int(body.get("seed", 0))))
        if todo:
            try:
                outs = self.sampler.generate(prompts, params)
            finally:
                self.sampler.release()   # the policy's rollouts and training get the memory back
            for i, comps in zip(todo, outs):
                c = comps[0]
                results[i] = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                   "content": completion_text(self.tok, c)},
                                           "finish_reason": c.finish_reason}],
                              "usage": {"completion_tokens": len(c.token_ids)}}
        self.stats.update(requests=len(bodies), too_long=len(bodies) - len(todo))
        return results

    def close(self) -> None:
        self.sampler.release()


def load_local_judge_chat(model_dir, device, max_batch_size: int = 64, engine: dict | None = None) -> LocalChat:
    """LocalChat over the checkpoint in model_dir (its own tokenizer and chat template); ValueError
    naming the folder when it has no chat template."""
    import torch

    from data.tokenizer import load_tokenizer
    from model.checkpoint import load_pretrained

    tok = load_tokenizer(None, model_dir)
    if tok.chat_template is None:
        raise ValueError(f"--judge-model {model_dir}: its tokenizer has no chat template (tokenizer_config.json "
                         f"'chat_template' or chat_template.jinja): a judge is asked in chat turns")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_pretrained(model_dir, dtype=dtype, device=device)
    return LocalChat(model, tok, max_batch_size=max_batch_size, engine=engine)
