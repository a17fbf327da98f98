"""The eval stage with --rollout-tp 2 on 2 gloo ranks, from a checkpoint folder: the same greedy
completions, and per-token log-probs within 1e-5, as one process with the whole model, for a
qwen2 (GQA, dense) and a deepseek_v3 (MLA + MoE) checkpoint; eval.json records rollout_tp and the
weight bytes each rank held while sampling (about half the one-process figure)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import Tokenizer
from model.checkpoint import save_pretrained
from model.config import ModelConfig
from model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[2]

# vocab_size 301 (odd): the vocabulary-parallel head and embedding pad the last rank's rows
CONFIGS = {
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, max_position_embeddings=256),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20,
                        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True,
                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, n_group=2, topk_group=1, num_nextn_predict_layers=1,
                        max_position_embeddings=256),
}


def _problems(n: int) -> list[dict]:
    return [{"question": f"What is {i} + {2 * i + 1}?", "answer": str(3 * i + 1)} for i in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_eval")
    problems = _problems(5)
    (root / "set.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    corpus = [f"{p['question']} <think>adding</think> <answer>{p['answer']}</answer>" for p in _problems(60)]
    tok = Tokenizer.train(corpus, vocab_size=300, min_frequency=1)
    out = {}
    for name, cfg in CONFIGS.items():
        config = ModelConfig(**cfg, vocab_size=tok.vocab_size + (1 - tok.vocab_size % 2),
                             eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
        assert config.vocab_size % 2 == 1
        torch.manual_seed(0)
        model = Transformer(config)
        with torch.no_grad():   # larger weights than the init's: sharper, varied greedy choices
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.25)
        save_pretrained(model, root / name, tokenizer=tok)
        out[name] = root / name
    return root, out


def _eval(root: Path, model_dir: Path, out: str, *flags, torchrun: bool) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if torchrun else [sys.executable]
    cmd = [*launcher, str(ROOT / "train.py"), "--stage", "eval", "--model", str(model_dir), "--eval-sets",
           str(root / "set.jsonl"), "--eval-n", "1", "--eval-temperature", "0", "--eval-save-logprobs",
           "--eval-max-new-tokens", "12", "--chat-template", "r1-zero", "--reward-workers", "1",
           "--out", str(root / out), *flags]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return root / out


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rollout_tp_2_samples_what_one_process_samples(folders, name):
    root, dirs = folders
    one = _eval(root, dirs[name], f"{name}-one", torchrun=False)
    two = _eval(root, dirs[name], f"{name}-tp2", "--rollout-tp", "2", torchrun=True)
    a = [json.loads(line) for line in (one / "samples-set.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (two / "samples-set.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 5
    assert [s["token_ids"] for s in a] == [s["token_ids"] for s in b]
    assert [s["completion"] for s in a] == [s["completion"] for s in b]
    assert len({tuple(s["token_ids"]) for s in a}) > 1, "greedy completions are all alike: a weak comparison"
    worst = max(abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa["logprobs"], sb["logprobs"]))
    assert worst < 1e-5, worst
    assert all(len(s["logprobs"]) == len(s["token_ids"]) == s["num_tokens"] for s in a + b)
    ra, rb = (json.loads((run / "eval.json").read_text())["set"] for run in (one, two))
    assert (ra["rollout_tp"], rb["rollout_tp"]) == (1, 2)
    ratio = rb["weight_bytes_per_rank"] / ra["weight_bytes_per_rank"]
    # about half: norms (and MLA's shared latent projections, the routers) are held whole on each rank,
    # and the one-process model also holds the MTP module, which decoding never runs
    print(f"{name}: greedy tokens equal, worst log-prob difference {worst:.2e}, weight bytes per rank "
          f"{rb['weight_bytes_per_rank']} (tp 2) / {ra['weight_bytes_per_rank']} (one process) = {ratio:.3f}")
    assert 0.35 < ratio < 0.6, (ra["weight_bytes_per_rank"], rb["weight_bytes_per_rank"])


def test_rollout_tp_that_does_not_divide_the_heads_is_refused_naming_them():
    from model.tensor_parallel import check_tensor_parallel

    with pytest.raises(ValueError, match="num_key_value_heads = 2 is not divisible by 4"):
        check_tensor_parallel(ModelConfig(**CONFIGS["qwen2"]), 4)
    with pytest.raises(ValueError, match="n_routed_experts = 4.*not divisible by 3"):
        check_tensor_parallel(ModelConfig(**{**CONFIGS["deepseek_v3"], "num_attention_heads": 6,
                                             "num_key_value_heads": 6, "intermediate_size": 96}), 3)
