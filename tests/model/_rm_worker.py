"""Worker of test_reward_model_sharded_over_two_ranks_scores_as_one_process:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/model/_rm_worker.py RM_DIR OUT

Each rank loads the reward model sharded by FSDP2 (each holding half of every block's rows) and
scores its own completions, rank 1 more of them than rank 0 (so the ranks run different numbers of
micro-batches inside one gather); rank 0 writes every rank's scores to OUT as JSON."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from data.tokenizer import load_tokenizer
    from evaluation.reward_model import RewardModelReward
    from model.parallel import is_sharded
    from model.reward_model import load_reward_model
    from runtime.distributed import all_gather_object, init_distributed, teardown

    rm_dir, out = sys.argv[1], Path(sys.argv[2])
    info = init_distributed("gloo")
    try:
        model = load_reward_model(rm_dir, fsdp={"param_dtype": None, "reduce_dtype": None})
        assert is_sharded(model)
        reward = RewardModelReward(f"rm:{rm_dir}", model, load_tokenizer(None, rm_dir), micro_batch_tokens=40)
        texts = [f"answer {i} " * (1 + i % 4) for i in range(3 + 4 * info.rank)]
        scores = reward(texts, prompts=[f"question {i}" for i in range(len(texts))])
        local_rows = sum(p.to_local().shape[0] for n, p in model.named_parameters() if "layers.0.mlp.up_proj" in n)
        gathered = all_gather_object({"rank": info.rank, "texts": texts, "scores": scores, "rows": local_rows})
        if info.rank == 0:
            out.write_text(json.dumps(gathered))
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
