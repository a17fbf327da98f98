"""Worker of tests/model/test_sharded_load.py, run under torchrun with 2 gloo ranks:

    python -m torch.distributed.run --nproc_per_node 2 tests/model/_sharded_load_worker.py OUT CKPT...

For each checkpoint folder and each target dtype (fp32, bf16) it builds the model the way the
training loops do under FSDP2 (model.build.build_model with fsdp=...: meta device, fully_shard,
to_empty, each rank reading its own rows) and compares it with load_pretrained's one-process
model: every gathered tensor bit-equal, the logits equal, each rank holding about half of the
numbers. It then exports the sharded model in the checkpoint's own dtype and checks the files.
Last, the bf16 compute policy: the dtypes that the router and a block's projection see in a
forward, and those of their gradients. Each rank writes OUT/rank{r}.json.
"""
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernels import token_logprobs  # noqa: E402
from model.build import build_model  # noqa: E402
from model.checkpoint import checkpoint_dtype, load_pretrained, save_pretrained  # noqa: E402
from model.moe import Router  # noqa: E402
from model.safetensors_io import SafetensorsFile  # noqa: E402
from runtime.distributed import all_gather_object, get_rank, init_distributed, teardown  # noqa: E402


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_checkpoint(path: Path, out: Path, dtype: torch.dtype) -> dict:
    args = Namespace(model=str(path), preset=None, seed=0)
    sharded = build_model(args, None, dtype=dtype, fsdp={"param_dtype": None, "reduce_dtype": None})
    reference = load_pretrained(path, dtype=dtype)
    ref_state = reference.state_dict()
    state = sharded.state_dict()
    unequal = [n for n in ref_state if not torch.equal(_full(state[n]).to("cpu"), ref_state[n])]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in sharded.parameters())
    total = sum(p.numel() for p in sharded.parameters())
    all_dtensor = all(hasattr(p, "to_local") for p in sharded.parameters())  # (the root stays whole after a forward)
    ids = torch.arange(1, 17).view(2, 8) % reference.config.vocab_size
    with torch.no_grad():
        logits = sharded(ids).float()
        want = reference(ids).float()
    result = {"unequal": unequal, "tensors": len(ref_state), "local_share": local / total,
              "all_dtensor": all_dtensor,
              "logits_max_diff": (logits - want).abs().max().item(),
              "tied": sharded.lm_head.weight is sharded.model.embed_tokens.weight}
    # the export: tensor by tensor from rank 0, in the checkpoint's own dtype
    source = checkpoint_dtype(path)
    target = out / f"export-{path.name}-{str(dtype).removeprefix('torch.')}"
    save_pretrained(sharded, target, dtype=source)
    if get_rank() == 0:
        back = load_pretrained(target, dtype=dtype).state_dict()
        stored = {d for f in target.glob("*.safetensors") for d, *_ in SafetensorsFile(f).entries.values()}
        result.update(export_stored_dtypes=sorted(str(d) for d in stored), export_source=str(source),
                      export_equal=all(torch.equal(back[n].float(), ref_state[n].to(source).float()) for n in ref_state
                                       if not n.endswith("e_score_correction_bias")))   # (kept in fp32)
    return result


def check_policy(path: Path) -> dict:
    """bf16 compute over fp32 master weights: what the router and a projection compute in."""
    args = Namespace(model=str(path), preset=None, seed=0)
    model = build_model(args, None, dtype=torch.float32,
                        fsdp={"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32})
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen.setdefault(name, {"weight": str(module.weight.dtype), "input": str(inputs[0].dtype)})
        return hook

    router = next(m for m in model.modules() if isinstance(m, Router))
    proj = model.layers[0].self_attn.o_proj
    router.register_forward_pre_hook(record("router"))
    proj.register_forward_pre_hook(record("o_proj"))
    routers = [m for m in model.modules() if isinstance(m, Router)]
    outputs = {}

    def record_scores(module, inputs, routing):   # returns None: the routing goes on unchanged
        outputs.setdefault("scores", str(routing.scores.dtype))

    router.register_forward_hook(record_scores)
    ids = torch.arange(1, 17).view(2, 8) % model.config.vocab_size
    model.train()
    hidden = model.forward_hidden(ids)                                       # [2, 8, D]
    logp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.output_weight, ids.reshape(-1))
    (-logp.mean()).backward()
    return {"seen": seen, "scores": outputs.get("scores"), "routers": len(routers), "hidden": str(hidden.dtype),
            "logp": str(logp.dtype),
            "router_master": str(router.weight.dtype), "router_grad": str(router.weight.grad.dtype),
            "proj_master": str(proj.weight.dtype), "proj_grad": str(proj.weight.grad.dtype)}


def main() -> int:
    out, paths = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    info = init_distributed(backend="gloo")
    torch.set_num_threads(1)
    result = {"rank": info.rank, "checkpoints": {}}
    for path in paths:
        for dtype in (torch.float32, torch.bfloat16):
            result["checkpoints"][f"{path.name}/{str(dtype).removeprefix('torch.')}"] = check_checkpoint(path, out, dtype)
    moe = next(p for p in paths if "moe" in p.name)
    result["policy"] = check_policy(moe)
    result["ranks_seen"] = all_gather_object(info.rank)
    (out / f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
