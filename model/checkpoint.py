"""Hugging Face checkpoint folders: `load_pretrained` reads one into a Transformer, `save_pretrained` writes one.

A folder holds `config.json` (translated by ModelConfig.from_hf_config), the weights as safetensors
(one `model.safetensors`, or shards `model-00001-of-0000N.safetensors` listed by
`model.safetensors.index.json`'s `weight_map`), optionally `generation_config.json` and the
tokenizer files. Tensor names are the on-disk names of published checkpoints, which are exactly the
names of our module tree (`model.layers.3.mlp.experts.7.up_proj.weight`), so a checkpoint maps 1:1
onto `Transformer.state_dict()`: there is no renaming table.

Memory: loading never holds two copies of the weights. The model is built on the meta device (no
storage), given its final dtype there, then allocated once with `to_empty`; each tensor is then read
from its file with plain `readinto` calls, straight into the parameter when the dtypes agree, else
through one reused staging buffer of at most READ_CHUNK_BYTES. Files are not mmapped, so no file
pages are charged to the process (page cache is not part of RSS), and the header's byte ranges
double as the truncation check. Peak RSS is the model plus one chunk (a few, in fp32, while
dequantising FP8).

Safetensors format (what `_SafetensorsFile` and `_write_safetensors` implement): 8 bytes little-endian
u64 N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}, padded with spaces, then the tensors' bytes (C order, little-endian), offsets relative to the
end of the header.

FP8 checkpoints (DeepSeek-V3's released weights): a linear `weight` is stored as float8_e4m3fn next to
`weight_scale_inv`, fp32 [ceil(out/b0), ceil(in/b1)] with (b0, b1) = quantization_config's
`weight_block_size` (128, 128). The dequantised weight is

    W[i, j] = float(W_fp8[i, j]) * scale_inv[i // b0, j // b1]

computed in fp32 block-row by block-row and cast to the target dtype.

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

# Bytes of the staging buffer used when a tensor's stored dtype differs from its parameter's (or the
# parameter is not in CPU memory): large enough that per-call overhead is negligible, small enough to
# be invisible next to any real model.
READ_CHUNK_BYTES = 4 << 20

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

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


# ================================================================================================
# safetensors files, read and written tensor by tensor
# ================================================================================================

class _SafetensorsFile:
    """The header of one .safetensors file, and reads of single tensors into caller-owned memory.

    Opening parses and validates the header only (no tensor bytes are read): each entry's dtype is
    known, its shape matches its byte range, and the file is long enough to hold every range (a
    shorter file is reported as truncated). `read_into` then fills a tensor with `readinto`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated or corrupt safetensors file ({size} bytes, "
                                 f"shorter than the 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"{self.path}: truncated or corrupt safetensors file (header length "
                                 f"{n} bytes, file {size} bytes)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: truncated or corrupt safetensors file (header is not valid "
                             f"JSON: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        end_of_data = 0
        for name, e in header.items():
            try:
                dtype_name, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: corrupt safetensors header entry for {name!r}: {e}") from None
            if dtype_name not in _ST_DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype_name!r}, which is not "
                                 f"supported; expected one of {sorted(_ST_DTYPES)}")
            dtype = _ST_DTYPES[dtype_name]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise ValueError(f"{self.path}: corrupt safetensors header: tensor {name!r} of shape "
                                 f"{list(shape)} and dtype {dtype_name} needs {nbytes} bytes but its "
                                 f"data_offsets are [{begin}, {end}]")
            self.entries[name] = (dtype, shape, begin, end)
            end_of_data = max(end_of_data, end)
        if self.data_start + end_of_data > size:
            raise ValueError(f"{self.path}: truncated or corrupt safetensors file: its header places "
                             f"tensor data up to byte {self.data_start + end_of_data}, but the file has "
                             f"{size} bytes")

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def names_in_file_order(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k][2])

    def read_into(self, f, name: str, out: torch.Tensor, start: int = 0) -> None:
        """Fill the contiguous CPU tensor `out` with the elements [start, start + out.numel()) of
        tensor `name` (flattened), whose dtype `out` must have. `f` is this file opened 'rb'."""
        dtype, _, begin, end = self.entries[name]
        assert out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu", (out.dtype, dtype)
        nbytes = out.numel() * dtype.itemsize
        offset = self.data_start + begin + start * dtype.itemsize
        assert offset + nbytes <= self.data_start + end, f"{name}: read past the tensor's bytes"
        if nbytes == 0:
            return
        f.seek(offset)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{self.path}: truncated or corrupt safetensors file: tensor {name!r} "
                                 f"ends early (read {got} of {nbytes} bytes at offset {offset})")
            got += n

    def read(self, f, name: str) -> torch.Tensor:
        """The whole tensor `name`, newly allocated (used for small tensors such as FP8 scales)."""
        dtype, shape, _, _ = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(f, name, out)
        return out


def _write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors) -> int:
    """Write a safetensors file from `specs` (name, dtype, shape), in that order, taking each tensor's
    data from the iterator `tensors` (one tensor per spec, produced only when it is written, so a
    whole shard never has to exist in memory). Returns the bytes of tensor data written.

    The header is fixed before any data is known, which is why dtypes and shapes come first.
    """
    header, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, dtype, t.shape, shape)
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return offset


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

    path = Path(path)
    config, raw_config = read_config(path, config_overrides)
    block = _fp8_block_size(raw_config, path / CONFIG_FILE)
    files, located = _checkpoint_files(path)

    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)
    expected = model.state_dict(keep_vars=True)  # name -> meta tensor, shapes and dtypes only
    declared_mtp = raw_config.get("num_nextn_predict_layers", raw_config.get("num_mtp_layers")) or 0
    plan = _plan_load(config, declared_mtp, expected, files, located, block, strict)

    model.to_empty(device=device)
    if plan.uninitialised:
        _init_weights(model)
    expected = model.state_dict(keep_vars=True)  # now the real tensors
    with torch.no_grad():
        staging = _Staging(torch.device(device))
        for file, names in plan.by_file.items():
            with open(file.path, "rb") as f:
                for name in names:
                    if name in plan.fp8_scales:
                        scale_file, scale_name = plan.fp8_scales[name]
                        with open(scale_file.path, "rb") as sf:
                            scale = scale_file.read(sf, scale_name)
                        _read_fp8(file, f, name, scale, block, expected[name].data, staging)
                    else:
                        _read_tensor(file, f, name, expected[name].data, staging)
    _finish(model)
    return model.eval()


class _LoadPlan:
    """What load_pretrained will read: tensor names per file (in file order), the FP8 scale of each
    quantised weight, and whether some parameters are left to the model's initialisation."""

    def __init__(self):
        self.by_file: dict[_SafetensorsFile, list[str]] = {}
        self.fp8_scales: dict[str, tuple[_SafetensorsFile, str]] = {}
        self.uninitialised = False


def _checkpoint_files(path: Path) -> tuple[list[_SafetensorsFile], dict[str, _SafetensorsFile]]:
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
            files[fname] = _SafetensorsFile(path / fname)
        located = {}
        for name, fname in weight_map.items():
            if name not in files[fname].entries:
                raise ValueError(f"{index}: weight_map places {name!r} in {fname}, but that file has no such tensor")
            located[name] = files[fname]
        return list(files.values()), located
    single = path / SINGLE_FILE
    if single.is_file():
        file = _SafetensorsFile(single)
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
        if file.dtype(name) in _FP8_DTYPES:
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


class _Staging:
    """One reusable CPU buffer for reads that cannot land in the parameter directly (pinned when the
    parameters live on a GPU, so the host-to-device copies are fast)."""

    def __init__(self, device: torch.device):
        self.pin = device.type == "cuda"
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        return self.buffer[:nbytes].view(dtype)


def _read_tensor(file: _SafetensorsFile, f, name: str, dest: torch.Tensor, staging: _Staging) -> None:
    """Copy checkpoint tensor `name` into `dest` (same shape), converting dtype chunk by chunk."""
    src_dtype = file.dtype(name)
    if dest.device.type == "cpu" and dest.dtype == src_dtype and dest.is_contiguous():
        file.read_into(f, name, dest)  # straight into the parameter: no extra copy at all
        return
    assert dest.is_contiguous(), f"{name}: parameters are expected to be contiguous"
    flat = dest.view(-1)
    step = max(1, READ_CHUNK_BYTES // src_dtype.itemsize)
    for start in range(0, flat.numel(), step):
        n = min(step, flat.numel() - start)
        buf = staging.get(n, src_dtype)
        file.read_into(f, name, buf, start)
        flat[start:start + n].copy_(buf)  # blocking: the next read reuses the buffer


def _read_fp8(file: _SafetensorsFile, f, name: str, scale_inv: torch.Tensor, block: tuple[int, int],
              dest: torch.Tensor, staging: _Staging) -> None:
    """Dequantise the block-quantised FP8 weight `name` into `dest` [O, I]: rows in groups of whole
    blocks, each group dequantised in fp32 and cast to dest's dtype (see the module docstring)."""
    b0, b1 = block
    rows, cols = dest.shape
    src_dtype = file.dtype(name)
    group = max(b0, READ_CHUNK_BYTES // max(1, 4 * cols) // b0 * b0)  # rows per chunk, whole blocks
    scale_inv = scale_inv.float()
    for r0 in range(0, rows, group):
        r1 = min(rows, r0 + group)
        w = staging.get((r1 - r0) * cols, src_dtype).view(r1 - r0, cols)
        file.read_into(f, name, w, r0 * cols)
        # dequantised where the weight lives (on a GPU, the multiply is cheap there); fp32 products
        # are exact IEEE operations, so the values do not depend on the device
        w = w.to(dest.device)
        s = scale_inv[r0 // b0: math.ceil(r1 / b0)].to(dest.device)      # [rb, ceil(I/b1)]
        s = s.repeat_interleave(b0, 0)[: r1 - r0].repeat_interleave(b1, 1)[:, :cols]  # [r, I]
        dest[r0:r1].copy_(w.float() * s)


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
                    dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
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
    """
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
        box = [problem]
        torch.distributed.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise FileExistsError(problem)

    state = _tensors_to_save(model, config)
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
        tensors = (_gathered(state[name], dt) for name, dt, _ in shard)
        if rank == 0 and error is None:
            try:
                total += _write_safetensors(tmp / fname, shard, tensors)
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
    if distributed:
        torch.distributed.barrier()
    if error is not None:
        raise error
    return path


def _tensors_to_save(model, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict as written: every tensor once (lm_head.weight dropped when tied)."""
    state = model.state_dict(keep_vars=True)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


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
