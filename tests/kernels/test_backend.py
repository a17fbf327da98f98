"""KERNELS_BACKEND dispatch: auto = Triton on CUDA tensors, torch twin on CPU tensors."""
import pytest
import torch

import kernels
from kernels import backend


def test_auto_picks_torch_on_cpu_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    assert backend.use_triton(torch.zeros(1)) is False
    monkeypatch.setenv("KERNELS_BACKEND", "auto")
    assert backend.use_triton(torch.zeros(1)) is False


def test_explicit_choices(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    assert backend.use_triton(torch.zeros(1)) is True
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    assert backend.use_triton(torch.zeros(1)) is False


def test_bad_values_raise(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backend.use_triton(torch.zeros(1))


PUBLIC = {
    # public function: (module, name stem, example arguments)
    "rms_norm": (kernels.norm, "rms_norm", lambda: (torch.randn(5, 16), torch.randn(16))),
    "token_logprobs": (kernels.logprobs, "token_logprobs",
                       lambda: (torch.randn(5, 8), torch.randn(11, 8), torch.tensor([0, 3, 10, 2, 2]))),
    "grpo_token_loss": (kernels.grpo_loss, "grpo_token_loss",
                        lambda: (torch.randn(2, 3), torch.randn(2), torch.ones(2, 3))),
    "flash_attention": (kernels.attention, "flash_attention",
                        lambda: (torch.randn(1, 5, 2, 16), torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16))),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_function_follows_the_variable(name, monkeypatch):
    module, stem, example = PUBLIC[name]
    calls = []
    # a kernel with a fast torch path (attention: SDPA) runs it under auto on CPU; torch runs the twin
    fast = "sdpa" if hasattr(module, f"{stem}_sdpa") else "torch"
    for path in ("triton", "torch", "sdpa"):
        if not hasattr(module, f"{stem}_{path}"):
            continue
        real = getattr(module, f"{stem}_{path}")
        monkeypatch.setattr(module, f"{stem}_{path}",
                            lambda *a, _p=path, _real=real, **k: calls.append(_p) or _real(*a, **k))
    public = getattr(kernels, name)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for setting, expected in (("auto", fast), ("torch", "torch"), ("triton", "triton")):
        monkeypatch.setenv("KERNELS_BACKEND", setting)
        calls.clear()
        out = public(*example())
        assert calls == [expected], (setting, calls)
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


def test_package_exports_the_public_contract():
    assert set(kernels.__all__) >= {"token_logprobs", "grpo_token_loss", "flash_attention", "rms_norm"}


def test_package_works_without_triton_installed(tmp_path):
    # a fresh interpreter in which `import triton` fails, as on macOS: the torch twins still run
    import subprocess
    import sys
    from pathlib import Path
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('no triton here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import os, torch, kernels\n"
        "from kernels.triton_import import HAVE_TRITON\n"
        "assert not HAVE_TRITON\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "kernels.rms_norm(x, torch.ones(8)).sum().backward()\n"
        "assert torch.isfinite(x.grad).all()\n"
        "os.environ['KERNELS_BACKEND'] = 'triton'\n"
        "try:\n"
        "    kernels.rms_norm(x, torch.ones(8))\n"
        "except ValueError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('KERNELS_BACKEND=triton without Triton did not raise')\n"
        "print('ok')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "KERNELS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
