"""Under torchrun: build the tiny model, shard it with model.parallel.apply_fsdp and write what this
rank holds, for tests/sft/test_distributed.py.

    torchrun --nproc_per_node 2 tests/sft/_fsdp_shard_worker.py OUT_DIR

Writes OUT_DIR/rank{r}.json: {"world_size", "all_dtensor", "local_numel", "global_numel",
"fsdp_modules", "gathered_equal"} where gathered_equal says that model.parallel.gathered() gives
back every parameter whole and equal to the unsharded model's on this rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from model.build import preset_config  # noqa: E402
from model.parallel import _fsdp_modules, apply_fsdp, gathered, is_sharded  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from runtime.distributed import init_distributed, teardown  # noqa: E402


def main(out: Path) -> None:
    info = init_distributed()
    try:
        torch.manual_seed(0)
        model = Transformer(preset_config("tiny", vocab_size=96))
        whole = {n: p.detach().clone() for n, p in model.named_parameters()}
        apply_fsdp(model)
        params = dict(model.named_parameters())
        with gathered(model):
            gathered_equal = all(torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, whole[n])
                                 for n, p in model.named_parameters())
        report = {
            "world_size": info.world_size,
            "sharded": is_sharded(model),
            "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
            "local_numel": sum(p.to_local().numel() for p in params.values()),
            "global_numel": sum(p.numel() for p in params.values()),
            "fsdp_modules": len(_fsdp_modules(model)),
            "gathered_equal": gathered_equal,
        }
        (out / f"rank{info.rank}.json").write_text(json.dumps(report))
    finally:
        teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
