"""Every collective goes through runtime/: no file of the package outside runtime/ calls (or even
names) a torch.distributed collective, however it is imported.

runtime/distributed.py's helpers put tensors on the device the group's backend needs and run waits
and object collectives on the gloo side group; a raw call elsewhere is how a CPU tensor reached an
NCCL all-reduce (GRPO's held-out evaluation died at step 0 that way). The scan resolves import
aliases (`import torch.distributed as td`, `from torch import distributed`, `from
torch.distributed import all_reduce as ar`) and covers the c10d module and functional collectives.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("train.py", "recipes", "rl", "sft", "evaluation", "serve", "sampling", "model", "kernels", "envs",
           "verify", "data")   # runtime/ is where collectives live
DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d", "torch.distributed._functional_collectives")
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_tensor",
    "all_gather_object", "all_gather_coalesced", "all_gather_single", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "gather", "gather_object", "scatter",
    "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "send_object_list", "recv_object_list", "new_group", "new_subgroups",
    "permute_tensor", "wait_tensor",
}


def _dotted(node) -> str | None:
    """'a.b.c' for a Name / Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def raw_collectives(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: name' for every reference to a torch.distributed collective in `source`."""
    tree = ast.parse(source, filename=filename)
    aliases: dict[str, str] = {}   # local name -> the dotted path it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Name, ast.Attribute)) or not isinstance(getattr(node, "ctx", None), ast.Load):
            continue
        dotted = _dotted(node)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        if head not in aliases:
            continue
        path = aliases[head] + (f".{rest}" if rest else "")
        module, _, name = path.rpartition(".")
        if module in DIST_MODULES and name in COLLECTIVES:
            found.append(f"{filename}:{node.lineno}: {path}")
    return sorted(set(found))


def test_no_collective_outside_runtime():
    files = []
    for top in PACKAGE:
        p = ROOT / top
        files += [p] if p.is_file() else sorted(p.rglob("*.py")) if p.is_dir() else []
    assert len(files) > 50
    found = [hit for f in files for hit in raw_collectives(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == [], "raw collectives outside runtime/ (use runtime.distributed's helpers):\n" + "\n".join(found)


def test_the_scan_sees_through_aliases():
    cases = {
        "import torch.distributed as td\ntd.all_reduce(x)\n": "torch.distributed.all_reduce",
        "import torch\ntorch.distributed.barrier()\n": "torch.distributed.barrier",
        "from torch import distributed\ndistributed.broadcast_object_list(b)\n": "torch.distributed.broadcast_object_list",
        "from torch import distributed as d\nf = d.all_gather_object\n": "torch.distributed.all_gather_object",
        "from torch.distributed import all_reduce as ar\nar(t)\n": "torch.distributed.all_reduce",
        "import torch.distributed._functional_collectives as funcol\nfuncol.all_reduce(t, 'sum', g)\n":
            "torch.distributed._functional_collectives.all_reduce",
        "from torch.distributed.distributed_c10d import reduce_scatter_tensor\n": None,   # imported, never used
        "def f():\n    import torch.distributed as dist\n    dist.new_group()\n": "torch.distributed.new_group",
    }
    for source, want in cases.items():
        hits = raw_collectives(source)
        assert (hits == []) if want is None else (len(hits) == 1 and hits[0].endswith(want)), (source, hits)
    # not collectives: queries, and other libraries' functions of the same name
    assert raw_collectives("import torch.distributed as dist\ndist.is_initialized(); dist.get_rank()\n") == []
    assert raw_collectives("import numpy as np\nnp.broadcast(a, b)\nfrom runtime.distributed import barrier\n"
                           "barrier()\n") == []
