"""bench/gpu_check.sh and the pure parts of bench/gpu_check.py, on CPU.

The wrapper: --dry-run writes a valid JSON report with every section skipped ("dry run"), a relative
--out lands in the caller's directory, and without CUDA the real run says so and exits non-zero
(no traceback, no file). The helpers: the GPU peak table and MFU, the error statistics and
tolerances, the atomic report rewrite, the float64 references against the torch twins, the accuracy
gate failing a wrong kernel, the budget cut-off, the throughput/MFU arithmetic of the training
sections. A marked-slow test runs the whole --cpu-smoke.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_script(*args, cwd=None, timeout=120):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def strict_json(path: Path) -> dict:
    """The file parsed as strict JSON (NaN / Infinity refused)."""
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- the wrapper

def test_dry_run_writes_every_section_skipped_with_a_reason(tmp_path):
    out = tmp_path / "x.json"
    p = run_script("--dry-run", "--out", out)
    assert p.returncode == 0, p.stderr
    report = strict_json(out)
    assert report["mode"] == "dry-run" and report["complete"] is True
    assert list(report["sections"]) == list(gc.SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "skipped" and section["reason"] == "dry run", (name, section)
        assert section["budget_s"] == gc.BUDGET_S[name]
    assert report["budget_total_s"] == sum(gc.BUDGET_S.values()) <= 300 - 20  # leaves room for start-up
    assert set(report["versions"]) >= {"python", "torch", "triton", "flash_attn", "flash_attn_3"}
    assert report["versions"]["torch"] == importlib.metadata.version("torch")
    for key in ("started_at", "finished_at", "updated_at"):
        assert report[key].endswith("+00:00"), report[key]   # ISO 8601, UTC
    assert not list(tmp_path.glob(".x.json.tmp-*")), "the temporary file of the atomic write was left behind"


def test_relative_out_lands_in_the_callers_directory(tmp_path):
    p = run_script("--dry-run", "--out", "rel/report.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert strict_json(tmp_path / "rel" / "report.json")["mode"] == "dry-run"
    assert not (ROOT / "rel" / "report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")
def test_without_cuda_it_says_so_and_exits_nonzero(tmp_path):
    out = tmp_path / "y.json"
    p = run_script("--out", out)
    assert p.returncode == 2
    assert "no CUDA device" in p.stderr and "--dry-run" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not out.exists()


def test_unknown_section_in_only_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        gc.main(["--dry-run", "--only", "kernels,nope", "--out", str(tmp_path / "z.json")])
    assert e.value.code == 2
    assert not (tmp_path / "z.json").exists()


# ---------------------------------------------------------------- peaks and MFU

@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
])
def test_peak_of_known_gpus(name, peak):
    got, how = gc.peak_bf16_tflops(name)
    assert got == peak and name in how


def test_unknown_gpu_has_no_peak_and_no_mfu():
    got, reason = gc.peak_bf16_tflops("Tesla T4")
    assert got is None and "Tesla T4" in reason
    assert gc.peak_bf16_tflops(None)[0] is None
    assert gc.mfu(1e14, None) is None


def test_mfu_is_achieved_over_peak():
    assert gc.mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert gc.mfu(float("nan"), 989.0) is None


# ---------------------------------------------------------------- error statistics and tolerances

def test_error_stats_values_and_chunking():
    ref = torch.tensor([3.0, -4.0, 0.0, 1.0], dtype=torch.float64)
    out = ref + torch.tensor([0.0, 0.5, 0.0, -0.25], dtype=torch.float64)
    s = gc.error_stats(out, ref)
    assert s["max_abs"] == 0.5 and s["max_ref"] == 4.0 and s["max_rel"] == 0.125
    assert s["rel_l2"] == pytest.approx(math.sqrt(0.25 + 0.0625) / math.sqrt(26.0))
    assert s["finite"] is True
    assert gc.error_stats(out, ref, chunk=3) == pytest.approx(s)   # chunked over the flat tensor: the same
    nan = gc.error_stats(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert nan["finite"] is False and not gc.within_tolerance(nan, "bfloat16")
    zero = gc.error_stats(torch.tensor([1e-3, 0.0]), torch.zeros(2))   # a zero reference: absolute figures
    assert zero["rel_l2"] == pytest.approx(1e-3) and zero["max_rel"] == pytest.approx(1e-3)


def test_bf16_tolerance_is_looser_than_fp16():
    tol = gc.TOLERANCES
    assert tol["bfloat16"]["rel_l2"] > tol["float16"]["rel_l2"] > tol["float32"]["rel_l2"]
    assert tol["bfloat16"]["max_rel"] > tol["float16"]["max_rel"] > tol["float32"]["max_rel"]
    stats = {"finite": True, "rel_l2": 0.02, "max_rel": 0.04}   # bf16-sized errors
    assert gc.within_tolerance(stats, "bfloat16") and not gc.within_tolerance(stats, "float16")
    assert not gc.within_tolerance({**stats, "max_rel": 0.5}, "bfloat16")   # one bad element is enough


# ---------------------------------------------------------------- the report file

def test_report_is_rewritten_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    report = gc.Report(path, {"sections": {}})
    report.set_section("kernels", {"status": "ok", "reason": "x", "figure": float("inf")})
    first = strict_json(path)
    assert first["sections"]["kernels"]["figure"] is None   # non-finite floats become null: strict JSON

    real_dump = json.dump

    def dump_then_fail(obj, f, **kw):
        real_dump(obj, f, **kw)
        f.write("{ half")
        raise OSError("disk full")
    monkeypatch.setattr(gc.json, "dump", dump_then_fail)
    with pytest.raises(OSError, match="disk full"):
        report.set_section("sft", {"status": "failed", "reason": "y"})
    assert strict_json(path) == first                     # the old file, intact
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]   # no temporary left behind


def test_json_safe_replaces_non_finite_and_keeps_the_rest():
    got = gc.json_safe({"a": [1.0, float("nan"), (2, float("-inf"))], 3: {"b": "c"}})
    assert got == {"a": [1.0, None, [2, None]], "3": {"b": "c"}}


# ---------------------------------------------------------------- the float64 references

def test_logprob_reference_equals_the_twin_with_gradients():
    from kernels.logprobs import token_logprobs_torch

    g = torch.Generator().manual_seed(0)
    N, D, V, T = 21, 16, 300, 0.7
    h, w = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    lp_r, ent_r, dh_r, dw_r = gc._ref_token_logprobs(h, w, t, T, True, g_lp, g_ent, chunk=8)
    hk, wk = h.float().requires_grad_(True), w.float().requires_grad_(True)
    lp, ent = token_logprobs_torch(hk, wk, t, T, with_entropy=True, chunk_tokens=5, chunk_vocab=64)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    for a, b in ((lp, lp_r), (ent, ent_r), (hk.grad, dh_r), (wk.grad, dw_r)):
        assert gc.error_stats(a, b)["rel_l2"] < 1e-5


def test_attention_reference_equals_the_twin_packed_and_bottom_right():
    from kernels.attention import flash_attention_torch

    g = torch.Generator().manual_seed(1)
    for spec in (dict(docs=(1, 9, 20), H=4, Hkv=2, dqk=24, dv=16), dict(B=2, T=5, S=17, H=2, Hkv=1, dqk=16, dv=16)):
        lead_q, lead_k, cu, seqs = gc._attn_layout(spec)
        q = torch.randn(*lead_q, spec["H"], spec["dqk"], generator=g, dtype=torch.float64)
        k = torch.randn(*lead_k, spec["Hkv"], spec["dqk"], generator=g, dtype=torch.float64)
        v = torch.randn(*lead_k, spec["Hkv"], spec["dv"], generator=g, dtype=torch.float64)
        cu_t = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
        twin = flash_attention_torch(q.float(), k.float(), v.float(), causal=True, cu_seqlens=cu_t)
        flat = lambda x: x.reshape(-1, *x.shape[-2:])  # noqa: E731
        ref = gc._ref_attention(flat(q), flat(k), flat(v), spec["dqk"] ** -0.5, seqs)
        assert gc.error_stats(twin.reshape(ref.shape), ref)["rel_l2"] < 1e-5, spec


def test_rms_norm_and_grpo_references_equal_the_twins():
    from kernels.grpo_loss import grpo_token_loss_torch
    from kernels.norm import rms_norm_torch

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(7, 33, generator=g, dtype=torch.float64) * 3, 1 + 0.1 * torch.randn(33, generator=g, dtype=torch.float64)
    assert gc.error_stats(rms_norm_torch(x.float(), w.float(), 1e-6), gc._ref_rms_norm(x, w, 1e-6))["rel_l2"] < 1e-6

    B, T = 6, 40
    lr = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.7
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.2).double()
    isw = torch.rand(B, T, generator=g, dtype=torch.float64)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = logp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    twin = grpo_token_loss_torch(lr.float(), adv.float(), mask.float(), eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                                 beta=0.04, logp=logp.float(), ref_logp=ref.float(), is_weight=isw.float())
    mine = gc._ref_grpo(lr, adv[:, None].expand(B, T), mask, isw, logp, ref, 0.2, 0.28, 3.0, 0.04)
    assert gc.error_stats(twin.loss, mine[0])["rel_l2"] < 1e-5
    assert gc.error_stats(twin.kl, mine[4])["rel_l2"] < 1e-4
    for got, want in zip((twin.clipped_low, twin.clipped_high, twin.clipped_dual), mine[1:4]):
        assert torch.equal(got != 0, want)
    assert bool(mine[3].any()) and bool(mine[1].any()) and bool(mine[2].any())   # every branch exercised


def test_paged_decode_reference_equals_the_twin_for_gqa_and_mla(tmp_path):
    from kernels.paged_attention import paged_decode_attention_torch

    ctx = smoke_context(tmp_path)
    for name, spec in gc.SMOKE.paged_cases:
        q, k, v, tables, lens, v_dim = gc._paged_inputs(ctx, "float32", spec)
        scale = spec["D"] ** -0.5
        twin = paged_decode_attention_torch(q, k, v, tables, lens, scale, v_dim)
        assert gc.error_stats(twin, gc._ref_paged_decode(q, k, v, tables, lens, scale, v_dim))["rel_l2"] < 1e-6, name
        row = gc._accuracy_paged_decode(ctx, "float32", (name, spec))   # the twin on the CPU (auto backend)
        assert row["pass"] and row["kernel"] == "paged_decode", row


# ---------------------------------------------------------------- the accuracy gate and the budget

def smoke_context(tmp_path) -> gc.Context:
    return gc.Context(profile=gc.SMOKE, work=tmp_path, keep_work=False, device_name=None)


def test_accuracy_case_passes_the_kernel_and_fails_a_wrong_one(tmp_path, monkeypatch):
    """The Triton attention (interpreter) on a packed case passes; the same with one token's output
    nudged by 0.05 fails on o alone, while its gradients still pass."""
    import kernels

    assert os.environ.get("TRITON_INTERPRET") == "1"   # tests/conftest.py
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    ctx = smoke_context(tmp_path)
    case = ("varlen_gqa", dict(docs=(1, 17, 6), H=2, Hkv=1, dqk=16, dv=16))
    good = gc._accuracy_attention(ctx, "float32", case)
    assert good["pass"], good["outputs"]

    real = kernels.flash_attention

    def nudged(*args, **kwargs):
        o = real(*args, **kwargs)
        bump = torch.zeros_like(o)
        bump[5, 1, 3] = 0.05
        return o + bump
    monkeypatch.setattr(kernels, "flash_attention", nudged)
    bad = gc._accuracy_attention(ctx, "float32", case)
    assert not bad["pass"]
    assert not gc.within_tolerance(bad["outputs"]["o"], "float32")
    assert all(gc.within_tolerance(bad["outputs"][k], "float32") for k in ("dq", "dk", "dv"))


def test_kernels_section_past_its_deadline_runs_nothing_and_fails(tmp_path):
    ctx = smoke_context(tmp_path)
    result = gc.section_kernels(ctx, gc.Deadline(at=0.0, budget_s=1))
    p = gc.SMOKE
    n = len(p.dtypes) * (len(p.logprob_cases) + len(p.attn_cases) + len(p.norm_cases) + len(p.grpo_cases)
                             + len(p.paged_cases))
    assert result["status"] == "failed" and result["cases"] == [] and len(result["not_run"]) == n
    assert "budget spent" in result["reason"]


def test_a_section_error_is_caught_with_its_traceback(tmp_path, monkeypatch):
    def boom(ctx, deadline):
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setitem(gc.RUNNERS, "sampler", boom)
    result = gc.run_section("sampler", smoke_context(tmp_path), gc.Deadline(at=1e12, budget_s=20))
    assert result["status"] == "failed" and "illegal memory access" in result["reason"]
    assert "RuntimeError" in result["traceback"] and result["budget_s"] == 20


# ---------------------------------------------------------------- throughput and MFU of the training runs

def test_sft_figures_use_steady_steps_and_the_mean_document():
    from model.config import ModelConfig
    from model.stats import flops_per_token

    config = ModelConfig(**gc.QWEN25_05B)
    rows = [{"step": i + 1, "loss": 12.0 - i, "tokens_per_s": tps, "step_s": 1.0}
            for i, tps in enumerate([100.0, 5000.0, 40000.0, 50000.0, 60000.0])]
    figs = gc.sft_figures(rows, {"tokens_seen": 5 * 256 * 165, "steps": 5}, config, 256, 989.0)
    assert figs["steady_steps"] == [3, 4, 5] and figs["tokens_per_s"] == 50000.0
    assert figs["mean_document_tokens"] == 165.0
    assert figs["mfu"] == pytest.approx(50000.0 * flops_per_token(config, 165) / 989e12)
    assert 0.1 < figs["mfu"] < 0.2   # 50k tok/s of a 0.5B model: ~15% of an H100
    assert gc.sft_figures(rows, None, config, 256, 989.0).get("mfu") is None   # no summary: no document length


def test_grpo_figures_count_train_ref_and_rollout_flops():
    from model.config import ModelConfig
    from model.stats import flops_per_token

    config = ModelConfig(**gc.QWEN25_05B)
    row = {"step": 2, "step_s": 4.0, "tokens_per_s": 4096.0, "response_length/mean": 128.0, "time/rollout": 2.0,
           "time/train": 1.0, "time/logprobs": 0.5, "loss": 0.1, "grad_norm": 1.0, "reward/mean": 0.5}
    figs = gc.grpo_figures([{**row, "step": 1}, row], config, 16, 8, 100.0, 0.04, 989.0)
    s = figs["per_step"][1]
    seqs, S = 128, 228.0
    train = flops_per_token(config, 228) * seqs * S
    ref = flops_per_token(config, 228, training=False) * seqs * S
    rollout = flops_per_token(config, 164, training=False) * (16 * 100.0 + seqs * 128.0)
    assert s["mfu_train"] == pytest.approx(train / 1.0 / 989e12)
    assert s["mfu_step"] == pytest.approx((train + ref + rollout) / 4.0 / 989e12)
    assert s["rollout_tokens_per_s"] == pytest.approx(seqs * 128 / 2.0)
    assert figs["steady_steps"] == [2] and figs["mfu_train"] == s["mfu_train"]
    assert gc.grpo_figures([row], config, 16, 8, 100.0, 0.04, None)["mfu_step"] is None


def test_token_parity_reward():
    assert gc.token_parity(["", ""], completion_ids=[[1, 3], [2, 3]]) == [1.0, 0.0]


# ---------------------------------------------------------------- the whole smoke run

@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    """Every section on CPU at tiny shapes (Triton interpreter, train.py subprocesses, the sampler):
    each one ok, the file complete."""
    out = tmp_path / "smoke.json"
    p = run_script("--cpu-smoke", "--out", out, timeout=1500)
    report = strict_json(out)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert report["complete"] and report["mode"] == "cpu-smoke"
    assert {n: s["status"] for n, s in report["sections"].items()} == dict.fromkeys(gc.SECTIONS, "ok")
    assert all(c["pass"] for c in report["sections"]["kernels"]["cases"])
    assert report["sections"]["sft"]["loss_last"] < report["sections"]["sft"]["loss_first"]
    assert [r["batch"] for r in report["sections"]["sampler"]["rows"]] == list(gc.SMOKE.sampler_batches)
