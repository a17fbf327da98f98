"""A rule reward and a reward-model reward in one weighted sum, routed per row by `reward_kind`
(verifiable rows get the rule rewards, open rows the reward model, rows without the column both),
checked by hand against transformers' scores of the same conversations."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data.chat import render  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from evaluation.reward_model import RewardModelReward  # noqa: E402
from model.reward_model import load_reward_model  # noqa: E402
from rl.rollout import RewardScorer, RolloutBatch  # noqa: E402

ROWS = [{"prompt": "What is 2 + 2?", "answer": "4", "reward_kind": "verifiable"},
        {"prompt": "Write a line about the sea.", "reward_kind": "open"},
        {"prompt": "What is 3 + 3?", "answer": "6"}]
TEXTS = ["It is \\boxed{4}.", "The sea is wide and grey.", "It is \\boxed{5}."]


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm")
    tok = Tokenizer.train([r["prompt"] for r in ROWS] + TEXTS, vocab_size=300, chat_template="chatml")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_id, max_position_embeddings=256)).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    tok.save(folder)
    return folder, tok, hf


def _batch(rows, texts):
    return RolloutBatch(group_size=1, rows=rows, prompt_ids=[[1]] * len(rows), completion_ids=[[2, 3]] * len(rows),
                        rollout_logp=[[0.0, 0.0]] * len(rows), finish_reasons=["stop"] * len(rows), texts=texts,
                        prompts=[r["prompt"] for r in rows])


def test_weighted_rule_and_reward_model_with_reward_kind_routing(rm):
    folder, tok, hf = rm
    spec = f"rm:{folder}"
    reward = RewardModelReward(spec, load_reward_model(folder), tok)
    scorer = RewardScorer(f"accuracy:1.0,{spec}:0.5", judges={spec: reward})
    batch = _batch(ROWS, TEXTS)
    scorer.score(batch)

    def hf_score(prompt, text):   # the oracle: transformers on the conversation rendered by hand
        convo = render([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}], "chatml",
                       **tok.special_tokens)
        with torch.no_grad():
            return hf(input_ids=torch.tensor([tok.encode(convo)])).logits[0, 0].item()

    r1, r2 = hf_score(ROWS[1]["prompt"], TEXTS[1]), hf_score(ROWS[2]["prompt"], TEXTS[2])
    acc, rms = batch.reward_columns["accuracy"], batch.reward_columns[spec]
    assert acc == [1.0, None, 0.0]                      # the open row gets no rule reward
    assert rms[0] is None and rms[1] == pytest.approx(r1, abs=1e-4) and rms[2] == pytest.approx(r2, abs=1e-4)
    want = [1.0, 0.5 * r1, 0.0 + 0.5 * r2]
    assert batch.rewards.tolist() == pytest.approx(want, abs=1e-4)


def test_normalisation_options(rm):
    folder, tok, _ = rm
    model = load_reward_model(folder)
    raw = RewardModelReward("rm:x", model, tok)(TEXTS, prompts=[r["prompt"] for r in ROWS])
    sig = RewardModelReward("rm:x", model, tok, normalize="sigmoid")(TEXTS, prompts=[r["prompt"] for r in ROWS])
    z = RewardModelReward("rm:x", model, tok, normalize="batch")(TEXTS, prompts=[r["prompt"] for r in ROWS])
    assert sig == pytest.approx([1 / (1 + math.exp(-s)) for s in raw])
    mean = sum(raw) / 3
    std = math.sqrt(sum((s - mean) ** 2 for s in raw) / 3)
    assert z == pytest.approx([(s - mean) / (std + 1e-6) for s in raw], abs=1e-5)
    # micro-batches of one row score as one batch of all
    tiny = RewardModelReward("rm:x", model, tok, micro_batch_tokens=1)(TEXTS, prompts=[r["prompt"] for r in ROWS])
    assert tiny == pytest.approx(raw, abs=1e-5)


def test_an_unknown_reward_kind_is_an_error_naming_the_row(rm):
    with pytest.raises(ValueError, match=r"row 2: reward_kind 'fuzzy'; expected verifiable or open"):
        RewardScorer("accuracy").score(_batch([ROWS[0], {**ROWS[1], "reward_kind": "fuzzy"}], TEXTS[:2]))


def test_grpo_with_a_reward_model_routed_by_reward_kind(rm, tmp_path):
    """2 GRPO steps through train.py with --reward task,rm:DIR: half the prompts verifiable, half open."""
    import json

    import train
    from tests.rl._grpo_worker import grpo_argv, make_model_dir, write_prompts
    folder, _, _ = rm
    make_model_dir(tmp_path / "model")
    rows = write_prompts(tmp_path / "prompts.jsonl", 8)
    for i, r in enumerate(rows):
        r["reward_kind"] = "verifiable" if i % 2 == 0 else "open"
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"rm:{folder}"
    assert train.main(grpo_argv(tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path / "run", "--reward",
                                f"arithmetic,{spec}:0.5", "--rm-normalize", "sigmoid")) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert 0.0 < m[f"reward/{spec}"] < 1.0 and 0.0 <= m["reward/arithmetic"] <= 1.0
        assert m["grad_norm"] >= 0


def test_a_reward_model_folder_is_checked_at_start(rm, tmp_path):
    from evaluation.reward_model import check_reward_model_flags
    from recipes.flags import stage_args
    folder, _, _ = rm
    check_reward_model_flags(stage_args(stage="grpo", reward=f"accuracy,rm:{folder}:0.5"))
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        check_reward_model_flags(stage_args(stage="grpo", reward=f"rm:{tmp_path}"))
