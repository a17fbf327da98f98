"""Training on multi-turn rollouts: observation tokens (tool outputs) are not the policy's. A rollout
built by hand (model tokens, an observation, model tokens) through the trainer's log-probs and the
policy loss: the observation positions get zero gradient in the loss, the KL and the entropy, the
model's tokens after the observation are conditioned on it, and the token counts are the model's;
then 2 GRPO steps through train.py with an environment that answers often, whose metrics carry
the tool counts and whose token count is the model's tokens only."""
import json

import pytest
import torch

import train
from envs.base import Environment, Episode, Reply
from model import ModelConfig, Transformer
from rl import loop
from rl.loop import sequence_logprobs
from rl.loss import policy_loss
from tests.rl._grpo_worker import PARITY_REWARD, grpo_argv, make_model_dir, write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/rl/conftest.py


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128))


@pytest.mark.parametrize("beta, entropy_coef", [(0.0, 0.0), (0.1, 0.01)])
def test_observation_tokens_get_no_gradient_and_condition_what_follows(beta, entropy_coef):
    model = _model()
    prompt = [1, 2, 3]
    completion = [10, 11, 40, 41, 42, 12, 13]       # model 10 11 | observation 40 41 42 | model 12 13
    mask = torch.tensor([[1.0, 1, 0, 0, 0, 1, 1]])
    logp, ent, _ = sequence_logprobs(model, [prompt], [completion], 1.0, with_entropy=True)
    logp.retain_grad()
    ent.retain_grad()
    ref = logp.detach() - 0.05
    loss, metrics = policy_loss(logp, None, torch.tensor([1.5]), mask, ref_logp=ref if beta else None, beta=beta,
                                entropy=ent, entropy_coef=entropy_coef)
    loss.backward()
    obs = mask[0] == 0
    assert torch.all(logp.grad[0, obs] == 0) and torch.all(logp.grad[0, ~obs] != 0)
    if entropy_coef:
        assert torch.all(ent.grad[0, obs] == 0) and torch.all(ent.grad[0, ~obs] != 0)
    assert float(metrics["tokens"]) == 4.0                             # the model's tokens only
    # the tokens after the observation are conditioned on it: other observation ids change their log-probs
    other, _, _ = sequence_logprobs(model, [prompt], [[10, 11, 50, 51, 52, 12, 13]], 1.0)
    assert torch.allclose(other[0, :2], logp[0, :2].detach())          # before it: unchanged
    assert not torch.allclose(other[0, 5:], logp[0, 5:].detach())      # after it: they differ
    # and they are the log-probs one forward over prompt + completion gives at those positions
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + completion]))[0].float(), -1)
    want = full[len(prompt) - 1:-1].gather(1, torch.tensor(completion)[:, None])[:, 0]
    assert torch.allclose(logp[0].detach(), want, atol=1e-5)


class Frequent(Environment):
    """Answers every stop (a text holding a common letter, digit or a space: a random model writes one
    within a few tokens) with a short observation, up to 3 times a rollout."""

    stop = list("aeiostnr0123456789 ")

    def start(self, row):
        return Episode(row)

    def respond(self, episode, text):
        if episode.calls >= 3:
            return Reply(None, status="none")
        episode.calls += 1
        return Reply(" = 7 ")


def test_grpo_with_an_environment_trains_on_model_tokens_only(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    make_model_dir(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 8)
    monkeypatch.setattr(loop, "rollout_environment", lambda args: (Frequent(), 40))
    out = tmp_path / "run"
    assert train.main(grpo_argv(model_dir, prompts, out, "--beta", "0", "--reward",
                                f"{PARITY_REWARD},format,tool_ok:0.1")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["tool/calls_per_rollout"] > 1 and r["tool/observation_tokens"] > 0 and r["tool/share"] > 0
        # the loss's token count is the model's tokens: the completions' lengths less the observations
        model_tokens = r["response_length/mean"] - r["tool/observation_tokens"]
        assert r["tokens"] == pytest.approx(4 * 4 * model_tokens)
        assert r["grad_norm"] > 0 and r["time/tools"] >= 0
        assert 0.0 <= r["reward/tool_ok"] <= 1.0            # the tool reward read the rollouts' counts
