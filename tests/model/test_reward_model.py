"""Sequence-classification reward models on our model code equal transformers' (fp32, random weights,
Qwen2 and Llama); a folder without a score head is refused naming what it lacks."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.reward_model import RewardModel, load_reward_model, score_head  # noqa: E402


def _hf_reward_model(kind: str, folder):
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=0,
                  tie_word_embeddings=False)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForSequenceClassification(config)
    else:
        config = transformers.LlamaConfig(**common, attention_bias=False)
        model = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():   # non-trivial norms, so a norm left out would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_reward_model_scores_equal_transformers(kind, tmp_path):
    hf = _hf_reward_model(kind, tmp_path / "rm")
    ours = load_reward_model(tmp_path / "rm")
    assert isinstance(ours, RewardModel) and not any(p.requires_grad for p in ours.parameters())
    torch.manual_seed(1)
    lengths = [17, 9, 30, 1]
    batch = torch.zeros(len(lengths), max(lengths), dtype=torch.long)     # right-padded with the pad id 0
    for i, n in enumerate(lengths):
        batch[i, :n] = torch.randint(1, 300, (n,))
    mask = (batch != 0).long()
    with torch.no_grad():
        want = hf(input_ids=batch, attention_mask=mask).logits[:, 0]      # the last non-pad token's score
    got = ours.rewards(batch, lengths)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-4, rtol=0)
    # one row alone gives its batched score: padding never reaches a real token
    alone = ours.rewards(batch[:1, :17], [17])
    assert torch.allclose(alone, got[:1], atol=1e-5)


def test_a_causal_lm_folder_is_not_a_reward_model(tmp_path):
    torch.manual_seed(0)
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=1, num_attention_heads=4,
                                                                num_key_value_heads=2, tie_word_embeddings=False))
    lm.save_pretrained(tmp_path / "lm", safe_serialization=True)
    with pytest.raises(ValueError, match=r"lm.*no 'score.weight'.*lm_head.weight"):
        score_head(tmp_path / "lm")
    with pytest.raises(ValueError, match="no 'score.weight'"):
        load_reward_model(tmp_path / "lm")
    two = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=2, pad_token_id=0))
    two.save_pretrained(tmp_path / "cls", safe_serialization=True)
    with pytest.raises(ValueError, match=r"score.weight has shape \[2, 32\]; a reward model has one label"):
        load_reward_model(tmp_path / "cls")


@pytest.mark.distributed
def test_reward_model_sharded_over_two_ranks_scores_as_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from data.tokenizer import Tokenizer, load_tokenizer
    from evaluation.reward_model import RewardModelReward
    _hf_reward_model("qwen2", tmp_path / "rm")
    Tokenizer.train([f"question {i} answer {i}" for i in range(20)], vocab_size=300, chat_template="chatml").save(
        tmp_path / "rm")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "tests" / "model" / "_rm_worker.py"), str(tmp_path / "rm"), str(tmp_path / "out")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = json.loads((tmp_path / "out").read_text())
    one = RewardModelReward("rm:x", load_reward_model(tmp_path / "rm"), load_tokenizer(None, tmp_path / "rm"))
    for r in ranks:
        assert r["rows"] == 64 and len(r["scores"]) == 3 + 4 * r["rank"]   # half of the 128 rows each
        want = one(r["texts"], prompts=[f"question {i}" for i in range(len(r["texts"]))])
        assert r["scores"] == pytest.approx(want, abs=1e-5)
