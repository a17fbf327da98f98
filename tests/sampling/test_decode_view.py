"""The decode view of an FSDP2 model: plain modules over the gathered weights (no FSDP hooks, no
sharded tensors), the same view object every rollout, and generation through it equal to
generation with the unsharded model, on 2 gloo ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.parallel import decode_view
from tests.sampling.test_sampler import CONFIGS

ROOT = Path(__file__).resolve().parents[2]

_WORKER = r'''
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from model import ModelConfig, Transformer
from model.parallel import apply_fsdp, decode_view, gathered
from sampling import Sampler, SamplingParams

dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[1])
result = {}
for name, cfg in json.loads(sys.argv[2]).items():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    reference = Transformer(ModelConfig(**cfg)).eval()
    reference.load_state_dict(model.state_dict())
    apply_fsdp(model)
    prompts = [[5, 6, 7], list(range(1, 14))]
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=8, stop_token_ids=[], seed=rank)
    want = Sampler(reference, 4, 32, verbose=False).generate(prompts, params)
    sampler = Sampler(model, 4, 32, verbose=False)
    views = []
    for _ in range(2):
        with gathered(model):
            view = decode_view(model, sampler._view)
            hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in view.modules())
            fsdp = sum(isinstance(m, FSDPModule) for m in view.modules())
            got = sampler.generate(prompts, params)
        views.append(id(sampler._view))
    same = all(a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
               for ga, gb in zip(want, got) for a, b in zip(ga, gb))
    result[name] = {"hooks": hooks, "fsdp_modules": fsdp, "same": same, "one_view": views[0] == views[1],
                    "model_hooks": sum(len(m._forward_pre_hooks) for m in model.modules())}
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
'''


def test_unsharded_model_is_its_own_view():
    from model.config import ModelConfig
    from model.transformer import Transformer
    m = Transformer(ModelConfig(**CONFIGS["qwen2"]))
    assert decode_view(m) is m


@pytest.mark.distributed
def test_decode_view_of_fsdp_model_has_no_hooks_and_generates_as_unsharded(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    configs = {"qwen2": CONFIGS["qwen2"], "deepseek_v3": CONFIGS["deepseek_v3"]}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), json.dumps(configs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        for name, x in result.items():
            assert x["model_hooks"] > 0, name               # the FSDP model has its hooks...
            assert x["hooks"] == 0 and x["fsdp_modules"] == 0, name   # ...its view none
            assert x["same"], (name, r)
            assert x["one_view"], name
