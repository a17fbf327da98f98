"""Hugging Face checkpoint folders: `load_pretrained` reads one into a Transformer, `save_pretrained` writes one.

A folder holds `config.json` (translated by ModelConfig.from_hf_config), the weights as safetensors
(one `model.safetensors`, or shards `model-00001-of-0000N.safetensors` listed by
`model.safetensors.index.json`'s `weight_map`), optionally `generation_config.json` and the
tokenizer files. Tensor names are the on-disk names of published checkpoints, which are exactly the
names of our module tree (`model.layers.3.mlp.experts.7.up_proj.weight`), so a checkpoint maps 1:1
onto `Transformer.state_dict()`: there is no renaming table.

Memory: loading never holds two copies of the weights. The model is built on the meta device (no
storage), given its final dtype there, checked against the checkpoint (`plan_load`: every missing,
unexpected or mis-shaped tensor is named before anything is allocated), then allocated once with
`to_empty`, and `load_into` reads each tensor from its file (model/safetensors_io.py: plain
`readinto`, no mmap, at most one READ_CHUNK_BYTES staging buffer). Peak RSS is the model plus one
chunk (a few, in fp32, while dequantising FP8 weights).

Sharded loading (model/build.py under FSDP2): the meta-device model is sharded with `fully_shard`
before `to_empty`, so each rank allocates only its shards, and `load_into` reads only each rank's
own rows of every tensor straight into its local shard: per rank, the loaded bytes are the model's
divided by the ranks.

FSDP: `save_pretrained` takes a model whose parameters are DTensors (FSDP2); every rank gathers each
tensor in turn (`full_tensor()`, a collective, so all ranks must call save_pretrained), only rank 0
writes, and a barrier closes the call.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from model.config import ModelConfig
from model.safetensors_io import (FP8_DTYPES, SafetensorsFile, Staging, read_fp8_rows, read_rows,
                                  write_safetensors)
from runtime.distributed import barrier, broadcast_object

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")

# Tensors save_pretrained(dtype=...) leaves in their own dtype: the MoE router's balancing bias,
# whose small update steps (bias_update_speed ~1e-3) bf16 would round away; published DeepSeek-V3
# checkpoints store it in fp32 too.
KEEP_FP32_ON_SAVE = ("e_score_correction_bias",)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Old Llama/Qwen checkpoints store the rope inverse frequencies; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ================================================================================================
# loading
# ================================================================================================

def read_config(path, config_overrides: dict | None = None) -> tuple[ModelConfig, dict]:
    """ModelConfig of the checkpoint folder `path`, with `config_overrides` (ModelConfig field names)
    applied, and the raw config.json dict (for keys ModelConfig does not hold, like quantization_config)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a checkpoint folder needs config.json)")
    raw = _read_json(file)
    config = ModelConfig.from_hf_config(raw, source=str(file))
    if config_overrides:
        fields = set(ModelConfig.__dataclass_fields__)
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise ValueError(f"config_overrides: unknown ModelConfig field(s) {unknown}; "
                             f"known fields: {sorted(fields)}")
        config = config.replace(**config_overrides)
    return config, raw


def load_pretrained(path, dtype: torch.dtype = torch.float32, device="cpu", *, strict: bool = True,
                    config_overrides: dict | None = None):
    """A Transformer holding the weights of the Hugging Face checkpoint folder `path`, in `dtype` on
    `device`, in eval mode (as transformers returns it).

    Every tensor of the model's state dict must be in the checkpoint and every checkpoint tensor in
    the model, with equal shapes; otherwise a ValueError names the keys (or the tensor, its file and
    both shapes). Exceptions: lm_head.weight may be absent when the embeddings are tied; absent MTP
    weights (`model.layers.{num_hidden_layers + j}.*`) only warn, and keep their initialisation,
    unless config.mtp_loss_weight > 0. `strict=False` turns missing and unexpected keys into
    warnings (missing ones keep the model's initialisation). FP8 block-quantised weights are
    dequantised (see the module docstring). Peak memory is the model plus one READ_CHUNK_BYTES buffer.
    """
    from model.transformer import Transformer

    config, raw_config = read_config(path, config_overrides)
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)
    plan = plan_load(path, model, raw_config, strict=strict)   # every naming/shape error, before allocating
    model.to_empty(device=device)
    load_into(model, plan)
    return model.eval()


def plan_load(path, model, raw_config: dict, *, strict: bool = True) -> "_LoadPlan":
    """Match the checkpoint folder `path` against `model`'s state dict (a model on the meta device,
    sharded or not: only names, global shapes and dtypes are read), so that every naming or shape
    problem is reported, naming the tensor and its file, before any memory is allocated. The
    returned plan is what load_into reads."""
    path = Path(path)
    block = _fp8_block_size(raw_config, path / CONFIG_FILE)
    files, located = _checkpoint_files(path)
    expected = model.state_dict(keep_vars=True)  # name -> meta tensor, shapes and dtypes only
    declared_mtp = raw_config.get("num_nextn_predict_layers", raw_config.get("num_mtp_layers")) or 0
    plan = _plan_load(model.config, declared_mtp, expected, files, located, block, strict)
    plan.block = block
    return plan


def load_into(model, plan: "_LoadPlan") -> None:
    """Fill `model` (allocated, e.g. by to_empty after plan_load) with the checkpoint's tensors.

    A parameter that FSDP2 has sharded (a DTensor sharded on dim 0, as model.parallel.apply_fsdp
    leaves them) receives only this rank's rows, read straight from the file into its local shard:
    no rank ever holds a whole tensor it does not own, let alone the whole model. Other tensors
    (buffers, an unsharded model) are read whole. Parameters the checkpoint does not hold (absent
    MTP weights) get the model's own initialisation first. The rope tables are rebuilt last.
    """
    if plan.uninitialised:
        _init_weights(model)
    state = model.state_dict(keep_vars=True)  # the real tensors
    first = next(iter(state.values()))
    device = first.to_local().device if hasattr(first, "to_local") else first.device
    with torch.no_grad():
        staging = Staging(device)
        for file, names in plan.by_file.items():
            with open(file.path, "rb") as f:
                for name in names:
                    dest, first_row = _local_rows(name, state[name], file.shape(name))
                    if name in plan.fp8_scales:
                        scale_file, scale_name = plan.fp8_scales[name]
                        with open(scale_file.path, "rb") as sf:
                            scale = scale_file.read(sf, scale_name)
                        read_fp8_rows(file, f, name, scale, plan.block, dest, staging, first_row)
                    elif dest.numel():
                        read_rows(file, f, name, dest, staging, first_row)
    _finish(model)


def read_tensor(plan: "_LoadPlan", file: SafetensorsFile, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Checkpoint tensor `name` of `file` (one the plan reads) whole, as a new CPU tensor in `dtype`
    (an FP8 weight dequantised): for loaders that keep only a slice of each tensor
    (model/tensor_parallel.py), one whole tensor at a time."""
    dest = torch.empty(file.shape(name), dtype=dtype)
    staging = Staging(torch.device("cpu"))
    with open(file.path, "rb") as f:
        if name in plan.fp8_scales:
            scale_file, scale_name = plan.fp8_scales[name]
            with open(scale_file.path, "rb") as sf:
                scale = scale_file.read(sf, scale_name)
            read_fp8_rows(file, f, name, scale, plan.block, dest, staging)
        elif dest.numel():
            read_rows(file, f, name, dest, staging)
    return dest


def _local_rows(name: str, t: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, int]:
    """(the memory this rank fills, its first row of the stored tensor) for state-dict tensor `t`:
    the whole tensor, or for an FSDP2 DTensor sharded on dim 0 its local shard. FSDP2 splits dim 0
    as torch.chunk does: chunks of ceil(N / W) rows, rank r's starting at r * ceil(N / W) (the last
    ranks may hold fewer rows, or none)."""
    if not hasattr(t, "to_local"):
        return t.data, 0
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    local = t.to_local()
    if placements != (Shard(0),):
        assert all(not isinstance(pl, Shard) for pl in placements), f"{name}: placements {placements} not supported"
        return local, 0
    world, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-shape[0] // world)
    first = min(rank * chunk, shape[0])
    rows = max(0, min(shape[0], first + chunk) - first)
    if local.shape[0] != rows:
        raise AssertionError(f"{name}: local shard of {tuple(local.shape)} on rank {rank} of {world}, expected "
                             f"{rows} rows of {tuple(shape)} (FSDP2's dim-0 split changed?)")
    return local, first


def checkpoint_dtype(path) -> torch.dtype:
    """The floating dtype holding most of the bytes of the checkpoint folder `path` (headers only:
    no tensor is read); bf16 for an FP8 checkpoint, whose dequantised weights are not FP8."""
    totals: dict[torch.dtype, int] = {}
    for file in _checkpoint_files(Path(path))[0]:
        for dtype, shape, begin, end in file.entries.values():
            if dtype.is_floating_point:
                totals[dtype] = totals.get(dtype, 0) + end - begin
    if not totals:
        return torch.float32
    main = max(totals, key=totals.get)
    return torch.bfloat16 if main in FP8_DTYPES else main


class _LoadPlan:
    """What load_into will read: tensor names per file (in file order), the FP8 scale of each
    quantised weight (and the block size), and whether some parameters are left to the model's
    initialisation."""

    def __init__(self):
        self.by_file: dict[SafetensorsFile, list[str]] = {}
        self.fp8_scales: dict[str, tuple[SafetensorsFile, str]] = {}
        self.block: tuple[int, int] = (128, 128)
        self.uninitialised = False


def _checkpoint_files(path: Path) -> tuple[list[SafetensorsFile], dict[str, SafetensorsFile]]:
    """The folder's safetensors files (headers parsed) and the file holding each tensor name."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map' object {{tensor name: file name}}")
        files = {}
        for fname in dict.fromkeys(weight_map.values()):
            if not isinstance(fname, str) or "/" in fname or fname.startswith("."):
                raise ValueError(f"{index}: weight_map names the file {fname!r}; expected a file name in the folder")
            files[fname] = SafetensorsFile(path / fname)
        located = {}
        for name, fname in weight_map.items():
            if name not in files[fname].entries:
                raise ValueError(f"{index}: weight_map places {name!r} in {fname}, but that file has no such tensor")
            located[name] = files[fname]
        return list(files.values()), located
    single = path / SINGLE_FILE
    if single.is_file():
        file = SafetensorsFile(single)
        return [file], dict.fromkeys(file.entries, file)
    other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f"; found only {other[:3]} (PyTorch pickles are not read: convert to safetensors)" if other else ""
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _fp8_block_size(raw_config: dict, source: Path) -> tuple[int, int]:
    q = raw_config.get("quantization_config") or {}
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{source}: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return tuple(block)


def _plan_load(config: ModelConfig, declared_mtp: int, expected: dict, files, located: dict, block,
               strict: bool) -> _LoadPlan:
    """Match checkpoint tensors to the model's state dict before anything is allocated, so every
    naming or shape problem is reported at once, cheaply."""
    plan = _LoadPlan()
    ckpt = {n: f for n, f in located.items() if not n.endswith(_IGNORED_SUFFIXES)}

    # FP8 weights and their scales: `x.weight` (float8) pairs with `x.weight_scale_inv`.
    scale_names = {n for n in ckpt if n.endswith("_scale_inv")}
    for name, file in ckpt.items():
        if file.dtype(name) in FP8_DTYPES:
            scale_name = name + "_scale_inv"
            if scale_name not in ckpt:
                raise ValueError(f"{file.path}: tensor {name!r} is stored as {file.dtype(name)} but the "
                                 f"checkpoint has no {scale_name!r} to dequantise it")
            plan.fp8_scales[name] = (ckpt[scale_name], scale_name)
    unpaired = sorted(n for n in scale_names if n.removesuffix("_scale_inv") not in plan.fp8_scales)
    loaded = {n: f for n, f in ckpt.items() if n not in scale_names or n in unpaired}

    # MTP modules that config_overrides removed (fewer num_nextn_predict_layers than config.json
    # declares): their tensors are skipped, as transformers skips DeepSeek-V3's.
    first_dropped = config.num_hidden_layers + config.num_nextn_predict_layers
    dropped = tuple(f"model.layers.{i}." for i in range(first_dropped, config.num_hidden_layers + declared_mtp))
    if dropped:
        loaded = {n: f for n, f in loaded.items() if not n.startswith(dropped)}

    # Names of one shared tensor (tied embeddings; the MTP modules' embed_tokens and shared_head.head)
    # need only one of them on disk. One copy is read, the main model's when present (published V3
    # checkpoints repeat the embedding and head inside the MTP layer), the others are skipped.
    mtp_prefixes = tuple(f"model.layers.{config.num_hidden_layers + j}." for j in range(config.num_nextn_predict_layers))
    aliases: dict[int, list[str]] = {}
    for name, t in expected.items():
        aliases.setdefault(id(t), []).append(name)
    missing = []
    for names in aliases.values():
        present = sorted((n for n in names if n in loaded), key=lambda n: bool(mtp_prefixes) and n.startswith(mtp_prefixes))
        if not present:
            missing += names
        for n in present[1:]:
            del loaded[n]
    unexpected = sorted(n for n in loaded if n not in expected)

    # MTP modules: published checkpoints hold them, transformers-saved ones do not.
    missing_mtp = [n for n in missing if mtp_prefixes and n.startswith(mtp_prefixes)]
    missing = [n for n in missing if n not in missing_mtp]
    where = files[0].path.parent
    if missing_mtp:
        if config.mtp_loss_weight > 0:
            raise ValueError(f"{where}: the checkpoint lacks the MTP weights ({_name_list(missing_mtp)}) but "
                             f"mtp_loss_weight is {config.mtp_loss_weight}; set mtp_loss_weight=0 (config_overrides) "
                             f"or num_nextn_predict_layers=0 to train without MTP")
        warnings.warn(f"{where}: the checkpoint lacks the MTP weights ({_name_list(missing_mtp)}); they keep "
                      f"their random initialisation (harmless while mtp_loss_weight is 0)", stacklevel=3)
        plan.uninitialised = True
    for kind, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            msg = f"{where}: {kind} tensor(s) in the checkpoint for model_type {config.model_type}: {_name_list(names)}"
            if strict:
                raise ValueError(msg + " (strict=False loads anyway)")
            warnings.warn(msg, stacklevel=3)
    plan.uninitialised |= bool(missing)

    mismatched = [n for n, f in loaded.items() if n in expected and tuple(expected[n].shape) != f.shape(n)]
    if mismatched:
        name, file = mismatched[0], loaded[mismatched[0]]
        more = f"; {len(mismatched) - 1} more tensor(s) mismatch: {_name_list(mismatched[1:])}" if len(mismatched) > 1 else ""
        raise ValueError(f"{file.path}: tensor {name!r} has shape {list(file.shape(name))} in the checkpoint but "
                         f"{list(expected[name].shape)} in the model (check config.json against the weights){more}")
    for name, file in loaded.items():
        if name not in expected:
            continue
        want = tuple(expected[name].shape)
        if name in plan.fp8_scales:
            scale_file, scale_name = plan.fp8_scales[name]
            if len(want) != 2:
                raise ValueError(f"{file.path}: FP8 tensor {name!r} has shape {list(want)}; only 2-D weights "
                                 f"are block-quantised")
            need = (math.ceil(want[0] / block[0]), math.ceil(want[1] / block[1]))
            if scale_file.shape(scale_name) != need:
                raise ValueError(f"{scale_file.path}: tensor {scale_name!r} has shape {list(scale_file.shape(scale_name))}; "
                                 f"expected {list(need)} for weight shape {list(want)} in blocks of {list(block)}")
        plan.by_file.setdefault(file, []).append(name)
    for file, names in plan.by_file.items():
        order = {n: i for i, n in enumerate(file.names_in_file_order())}
        names.sort(key=order.__getitem__)
    return plan


def _name_list(names: list[str], limit: int = 10) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"{len(names)}: {shown}" + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _init_weights(model) -> None:
    """Initialise every parameter the model's own way (before loading over it), for the ones the
    checkpoint does not hold."""
    init = getattr(model, "init_weights", None)
    if init is None:
        raise TypeError(f"{type(model).__name__} has no init_weights() method, needed to initialise the "
                        f"parameters a checkpoint does not hold")
    with torch.no_grad():
        init()


def _finish(model) -> None:
    """Rebuild what to_empty cannot: the rope tables (model.rope, not a buffer), whose frequencies
    were computed on the meta device; then check that no tensor was left on meta."""
    from model.rope import RotaryEmbedding

    model.rope = RotaryEmbedding(model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left[:10]}"


# ================================================================================================
# saving
# ================================================================================================

def save_pretrained(model, path, tokenizer=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    dtype: torch.dtype | None = None, overwrite: bool = False, adapters: str = "merge") -> Path:
    """Write `model` as a Hugging Face folder at `path` that transformers (and load_pretrained) load.

    Writes config.json (with `torch_dtype`/`dtype` set to what is stored), generation_config.json,
    the weights (`model.safetensors`, or shards of at most `max_shard_bytes` each plus
    model.safetensors.index.json) and, when `tokenizer` is given (any object with `save(dir)`, such as
    data.tokenizer.Tokenizer), its files and chat template. `dtype` casts floating-point tensors
    (None: as they are in the model; KEEP_FP32_ON_SAVE tensors are never cast). With tied embeddings
    lm_head.weight is not written.

    The folder appears atomically: everything is written into a temporary folder beside `path`,
    then renamed. An existing empty folder at `path` (a `tempfile.TemporaryDirectory()`, say) is
    replaced by that rename, as transformers writes into one; an existing non-empty `path` is an
    error unless `overwrite=True`; it is then moved aside and the new folder renamed into place
    before the old one is deleted, so `path` never holds a half-written checkpoint. With DTensor parameters (FSDP2) every rank must call this; only rank 0
    writes. Returns `path`.

    A model with LoRA adapters (model/lora.py) is written merged by default: each adapted weight
    gathered, W + s B A added in fp32, then cast; `adapters="drop"` writes the base weights alone.
    Adapter tensors are never written into the folder (model.lora.save_adapter writes them apart).
    """
    from model.lora import merge_into, weight_deltas

    if adapters not in ("merge", "drop"):
        raise ValueError(f"save_pretrained: adapters={adapters!r}, expected 'merge' or 'drop'")
    path = Path(path)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    config: ModelConfig = model.config
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    problem = None
    if rank == 0 and path.exists():
        problem = (f"{path}: exists and is not a folder" if not path.is_dir() else
                   None if overwrite or not any(path.iterdir()) else
                   f"{path}: already exists and is not empty; pass overwrite=True to replace it")
    if distributed:  # every rank raises, rather than waiting in gathers rank 0 would never join
        problem = broadcast_object(problem)
    if problem:
        raise FileExistsError(problem)

    state = _tensors_to_save(model, config)
    deltas = weight_deltas(model) if adapters == "merge" else {}

    def whole(name, dt):
        if name not in deltas:
            return _gathered(state[name], dt)
        return merge_into(deltas[name], _gathered(state[name], state[name].dtype)).to(dt)

    specs = [(name, _saved_dtype(name, t, dtype), tuple(t.shape)) for name, t in state.items()]
    shards = _shard(specs, max_shard_bytes)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"

    # A failure on rank 0 is held until every gather has been taken part in and the ranks have met
    # at the barrier: raising at once would leave the other ranks waiting in a collective.
    error = None
    if rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = (whole(name, dt) for name, dt, _ in shard)
        if rank == 0 and error is None:
            try:
                total += write_safetensors(tmp / fname, shard, tensors)
                weight_map.update(dict.fromkeys((name for name, _, _ in shard), fname))
            except BaseException as e:
                error = e
        for _ in tensors:  # the gathers nobody wrote (all of them off rank 0)
            pass
    if rank == 0 and error is None:
        try:
            if len(shards) > 1:
                n_params = sum(math.prod(shape) for _, _, shape in specs)
                _write_json(tmp / INDEX_FILE, {"metadata": {"total_parameters": n_params, "total_size": total},
                                               "weight_map": weight_map})
            hf = config.to_hf_config()
            hf["torch_dtype"] = hf["dtype"] = str(dtype or _main_dtype(specs)).removeprefix("torch.")
            _write_json(tmp / CONFIG_FILE, hf)
            _write_json(tmp / GENERATION_CONFIG_FILE, _generation_config(config, tokenizer))
            if tokenizer is not None:
                tokenizer.save(tmp)
            _replace_folder(tmp, path)
        except BaseException as e:
            error = e
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()   # the others wait on the side group while rank 0 renames and fsyncs (no watchdog)
    if error is not None:
        raise error
    return path


def _tensors_to_save(model, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict as written: every tensor once (lm_head.weight dropped when tied), without LoRA
    adapters (model/lora.py: a Hugging Face folder holds the base, or the merged weights)."""
    state = model.state_dict(keep_vars=True)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}


def _saved_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not t.is_floating_point() or name.endswith(KEEP_FP32_ON_SAVE):
        return t.dtype
    return dtype


def _main_dtype(specs) -> torch.dtype:
    """The dtype holding most of the bytes (what config.json's torch_dtype reports)."""
    totals: dict[torch.dtype, int] = {}
    for _, dt, shape in specs:
        if dt.is_floating_point:
            totals[dt] = totals.get(dt, 0) + math.prod(shape) * dt.itemsize
    return max(totals, key=totals.get) if totals else torch.float32


def _shard(specs, max_shard_bytes: int) -> list[list]:
    """Split `specs` in order into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    return shards + [current] if current or not shards else shards


def _gathered(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A full, contiguous CPU copy of one tensor in `dtype` (a DTensor is all-gathered first)."""
    t = t.detach().to(dtype)  # cast the local shard first: less to gather
    if hasattr(t, "full_tensor"):  # DTensor (FSDP2): a collective every rank takes part in
        t = t.full_tensor()
    return t.to(device="cpu").contiguous()


def _generation_config(config: ModelConfig, tokenizer) -> dict:
    """bos/eos/pad ids from the config, filled from the tokenizer where the config has none."""
    def from_tok(attr):
        return getattr(tokenizer, attr, None) if tokenizer is not None else None

    eos = config.eos_token_ids or ([from_tok("eos_id")] if from_tok("eos_id") is not None else [])
    out = {"_from_model_config": True}
    bos = config.bos_token_id if config.bos_token_id is not None else from_tok("bos_id")
    pad = config.pad_token_id if config.pad_token_id is not None else from_tok("pad_id")
    if bos is not None:
        out["bos_token_id"] = bos
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if pad is not None:
        out["pad_token_id"] = pad
    return out


def _replace_folder(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` at `path`. An empty folder at `path` is replaced by one rename
    (rename(2) replaces an empty directory atomically, and fails, losing nothing, if something was
    written there meanwhile); a non-empty one is moved aside first and deleted last. A crash
    between those two renames leaves no folder at `path` but both complete copies beside it."""
    if path.is_dir() and not any(path.iterdir()):
        os.rename(tmp, path)
    elif path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


# ================================================================================================
# JSON files
# ================================================================================================

def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _write_json(file: Path, value: dict) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
