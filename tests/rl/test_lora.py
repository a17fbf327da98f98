"""GRPO with LoRA (model/lora.py through rl/loop.py), against peft on transformers where it can be:

- a rollout after an optimizer step samples from the updated adapters, in one process and on 2 ranks
  (FSDP2 gathered, and split by tensor parallelism), for qwen2 and MLA + MoE (kv_b_proj adapted,
  which MLA's absorbed decode reads as a weight), leaving every weight as it was;
- a LoRA run trains the adapters alone (its reference is the base: the adapters switched off), and
  its checkpoints hold the merged model in hf/ and a PEFT adapter in adapter/ that peft loads onto
  the base with the same logits; it resumes exactly from adapters-only state;
- --lora-init loads a peft-made adapter; the generate stage samples base + adapter (one process and
  --rollout-tp 2) exactly as it samples peft's merged model;
- bad --lora-* flags fail before the run directory is touched, naming the flag, pattern or tensor.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from recipes.flags import build_parser
from recipes.stages import check_stage
from tests.rl._grpo_worker import crash_at_step_3_then_resume, grpo_argv, make_model_dir, write_prompts

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is the LoRA tests' oracle (the test extra)")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py
TIMING_KEYS = ("time/rollout", "time/reward", "time/logprobs", "time/train", "step_s", "tokens_per_s",
               "memory/rollout_peak_gib", "memory/step_peak_gib")
PEFT_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 33, 101, 7, 250, 64, 12, 9]])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny qwen2 folder, prompts, and a peft-made adapter for it (B random, so it shows) with
    peft's merged model saved beside it (tokenizer files copied in)."""
    d = tmp_path_factory.mktemp("grpo_lora")
    make_model_dir(d / "model")
    write_prompts(d / "prompts.jsonl", 32)
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False)
    adapted = peft.get_peft_model(_hf(d / "model"), config)
    adapted.save_pretrained(d / "peft_adapter")
    adapted.merge_and_unload().save_pretrained(d / "peft_merged")
    for f in (d / "model").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / "peft_merged" / f.name)
    return d


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- the rollout sees the update ----------------------------------------------------------------

@pytest.mark.parametrize("ranks", [1, 2])
def test_a_rollout_after_an_optimizer_step_sees_the_updated_adapter(ranks, tmp_path):
    worker = str(ROOT / "tests" / "rl" / "_lora_worker.py")
    cmd = [sys.executable, worker, str(tmp_path)] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    for r in range(ranks):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        modes = {"qwen2/tp1", "deepseek_v3/tp1"} | ({"qwen2/tp2", "deepseek_v3/tp2"} if ranks == 2 else set())
        assert set(result) == modes
        for mode, m in result.items():
            assert m["adapters_moved"] and m["tokens"] > 0, (mode, m)
            # the sampler's log-probs are the trainer's (adapters applied unmerged) ...
            assert m["vs_trainer"] <= 1e-4, (r, mode, m)
            # ... and not the base's: the step moved the model and the rollout saw it
            assert m["vs_base"] > 0.1, (r, mode, m)
            # every weight (this rank's shard) is bit for bit what it was before the rollout
            assert m["weights_unchanged"], (r, mode, m)


# ---- a LoRA run ---------------------------------------------------------------------------------

def _adapted_linears(model_dir, targets):
    hf = _hf(model_dir)
    return {n: m for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


def test_grpo_with_lora_trains_the_adapters_and_exports_merged_and_peft(assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", run, "--lora-rank", 4,
                                "--lora-alpha", 16, "--beta", 0.04, "--eval-data", assets / "prompts.jsonl",
                                "--eval-problems", 4, "--eval-max-new-tokens", 8, "--eval-samples", 1)) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4, alpha 16 on 14 layers" in out
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    linears = _adapted_linears(assets / "model", targets)
    assert len(linears) == 14
    trainable = sum(4 * (m.in_features + m.out_features) for m in linears.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == trainable < summary["params"] / 5
    # AdamW's state for the adapters alone: exp_avg and exp_avg_sq (fp32) and a step count per tensor
    assert summary["optimizer_state_bytes"] == 8 * trainable + 4 * 2 * len(linears)
    config = json.loads((run / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["lora_alpha"] == 16 and config["lora_targets"] == "all-linear"
    rows = [r for r in _metrics(run) if r["step"] > 0]                      # (step 0: the initial evaluation)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["kl"] > 0 and all(r["kl"] == r["kl"] for r in rows)   # the reference: the base
    assert 0.0 <= rows[-1]["eval/greedy_accuracy"] <= 1.0                    # held-out sampling, adapters merged

    ckpt = run / "checkpoints" / "step-00000002"
    assert not list((ckpt / "hf").glob("adapter*"))              # nothing there for peft to pick up
    adapter_cfg = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 16 and sorted(adapter_cfg["target_modules"]) == \
        sorted(targets) and adapter_cfg["base_model_name_or_path"] == str(assets / "model")
    saved = torch.load(ckpt / "model.pt", weights_only=True)       # resumable state: the adapters only
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved) and len(saved) == 28

    merged = _hf(ckpt / "hf")
    with_peft = peft.PeftModel.from_pretrained(_hf(assets / "model"), ckpt / "adapter").eval()
    want = _logits(merged, IDS)
    torch.testing.assert_close(_logits(with_peft, IDS), want, atol=1e-4, rtol=0)
    assert (want - _logits(_hf(assets / "model"), IDS)).abs().max() > 1e-4   # the adapters were trained
    base = _hf(assets / "model").state_dict()
    for name, t in merged.state_dict().items():                   # what has no adapter is the base, exactly
        if not any(f"{tname}." in name for tname in targets):
            assert torch.equal(t, base[name]), name


def test_grpo_with_lora_resumes_exactly(assets, tmp_path, monkeypatch):
    common = ("--max-steps", 4, "--save-every", 2, "--keep-last", 3, "--lora-rank", 4, "--beta", 0.04)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", straight, *common)) == 0
    crash_at_step_3_then_resume(monkeypatch, grpo_argv(assets / "model", assets / "prompts.jsonl", split, *common))
    for sub in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):
        from safetensors.torch import load_file
        a = load_file(straight / "checkpoints" / "step-00000004" / sub)
        b = load_file(split / "checkpoints" / "step-00000004" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    mid = load_file(straight / "checkpoints" / "step-00000002" / "adapter" / "adapter_model.safetensors")
    end = load_file(straight / "checkpoints" / "step-00000004" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(mid[k], end[k]) for k in mid)      # steps 3 and 4 moved the adapters
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(_metrics(straight)) == strip(_metrics(split))


# ---- a peft-made adapter in ---------------------------------------------------------------------

def test_lora_init_starts_from_a_peft_made_adapter(assets, tmp_path):
    run = tmp_path / "run"
    assert train.main(grpo_argv(assets / "model", assets / "prompts.jsonl", run, "--lora-init",
                                assets / "peft_adapter", "--lr", 1e-12, "--max-steps", 1, "--beta", 0)) == 0
    # (--lr must be positive: one step of 1e-12 leaves the adapter where peft put it, within 1e-11)
    ckpt = run / "checkpoints" / "step-00000001"
    with_peft = peft.PeftModel.from_pretrained(_hf(assets / "model"), assets / "peft_adapter").eval()
    want = _logits(with_peft, IDS)
    torch.testing.assert_close(_logits(_hf(ckpt / "hf"), IDS), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(_hf(assets / "peft_merged"), IDS), want, atol=1e-4, rtol=0)
    from safetensors.torch import load_file
    ours, theirs = (load_file(f / "adapter_model.safetensors") for f in (ckpt / "adapter", assets / "peft_adapter"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-9, rtol=0)
    cfg = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(PEFT_TARGETS) and cfg["r"] == 4


def _generate_flags(model, data, out, *extra):
    return ["--stage", "generate", "--model", str(model), "--chat-template", "r1-zero", "--data", str(data),
            "--out", str(out), "--gen-n", "2", "--gen-batch-prompts", "4", "--gen-max-new-tokens", "10",
            "--gen-temperature", "1.0", "--reward", "format", "--keep-if", "none", "--reward-workers", "1",
            "--seed", "3", *map(str, extra)]


def _generated(run):
    return [json.loads(line) for line in (run / "generated.jsonl").read_text().splitlines()]


def test_generate_samples_base_plus_adapter_as_peft_merges_it(assets, tmp_path):
    data = tmp_path / "prompts.jsonl"
    write_prompts(data, 4)
    assert train.main(_generate_flags(assets / "peft_merged", data, tmp_path / "merged")) == 0
    assert train.main(_generate_flags(assets / "model", data, tmp_path / "adapter", "--lora-init",
                                      assets / "peft_adapter")) == 0
    assert train.main(_generate_flags(assets / "model", data, tmp_path / "base")) == 0
    want = _generated(tmp_path / "merged")
    assert len(want) == 8 and _generated(tmp_path / "adapter") == want
    assert _generated(tmp_path / "base") != want                  # the adapter changes what is sampled
    # the same with the model split over 2 ranks (--rollout-tp 2: merged as each tensor is read, then cut)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train.py"), *_generate_flags(assets / "model", data, tmp_path / "tp", "--lora-init",
                                                                   assets / "peft_adapter", "--rollout-tp", 2)],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    assert _generated(tmp_path / "tp") == want


# ---- bad input ----------------------------------------------------------------------------------

def _check(argv):
    args = build_parser().parse_args(argv)
    check_stage(args, _one_process(), log=lambda *_: None)


def _one_process():
    from runtime.distributed import DistInfo
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def test_bad_lora_flags_fail_naming_what_is_wrong(assets, tmp_path):
    base = grpo_argv(assets / "model", assets / "prompts.jsonl", tmp_path / "run")
    with pytest.raises(ValueError, match=r"'qkv_proj' matches no linear layer .* named down_proj, gate_proj, k_proj"):
        _check([*base, "--lora-rank", "4", "--lora-targets", "q_proj,qkv_proj"])
    with pytest.raises(ValueError, match="--lora-init .* leave out --lora-rank"):
        _check([*base, "--lora-rank", "4", "--lora-init", str(assets / "peft_adapter")])
    with pytest.raises(ValueError, match="need --lora-rank"):
        _check([*base, "--lora-alpha", "16"])
    with pytest.raises(ValueError, match="--lora-rank -1"):
        _check([*base, "--lora-rank", "-1"])
    with pytest.raises(ValueError, match="--lora-dropout 1.5"):
        _check([*base, "--lora-rank", "4", "--lora-dropout", "1.5"])
    with pytest.raises(ValueError, match="--ref-refresh-every 5 with LoRA"):
        _check([*base, "--lora-rank", "4", "--ref-refresh-every", "5"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        _check([*base, "--lora-init", str(tmp_path)])
    with pytest.raises(ValueError, match="--lora-rank 4 trains adapters; --stage generate only samples"):
        _check(_generate_flags(assets / "model", assets / "prompts.jsonl", tmp_path / "g", "--lora-rank", 4))
    # an adapter made for another base: a wider model, so every adapter's shape is off
    other = tmp_path / "wide"
    make_model_dir(other, hidden=48)
    wide = peft.get_peft_model(_hf(other), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    wide.save_pretrained(tmp_path / "wide_adapter")
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"
                                         r"\.weight' has shape \[4, 48\] but this model's layer needs \[4, 32\]"):
        _check([*base, "--lora-init", str(tmp_path / "wide_adapter")])
    assert not (tmp_path / "run").exists()                        # nothing was written
