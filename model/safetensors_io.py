"""The safetensors format, read and written tensor by tensor, and reads of row ranges into shards.

    file = SafetensorsFile(path)                  # header only: dtypes, shapes, byte ranges checked
    with open(file.path, "rb") as f:
        read_rows(file, f, name, dest, staging, first_row)            # rows [first_row, first_row + len(dest))
        read_fp8_rows(file, f, name, scale_inv, block, dest, staging, first_row)   # dequantised
    write_safetensors(path, specs, tensors)       # specs first (the header), then each tensor as it comes

Format: 8 bytes little-endian u64 N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}, padded with spaces, then the tensors' bytes (C order,
little-endian), offsets relative to the end of the header.

Reads use plain `readinto` into caller-owned memory (no mmap, so no file pages are charged to the
process: the page cache is not part of RSS), straight into the destination when its dtype is the
stored one and it lives in CPU memory, else through one reused staging buffer of at most
READ_CHUNK_BYTES. A destination may be a block of whole rows of the stored tensor (an FSDP2 shard:
rows [first_row, first_row + dest.shape[0]) of dim 0), so a rank reads only the bytes of its own
rows.

FP8 checkpoints (DeepSeek-V3's released weights): a linear `weight` is stored as float8_e4m3fn next to
`weight_scale_inv`, fp32 [ceil(out/b0), ceil(in/b1)] with (b0, b1) = quantization_config's
`weight_block_size` (128, 128). The dequantised weight is

    W[i, j] = float(W_fp8[i, j]) * scale_inv[i // b0, j // b1]

computed in fp32 a group of rows at a time and cast to the destination's dtype.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

# Bytes of the staging buffer used when a tensor's stored dtype differs from its parameter's (or the
# parameter is not in CPU memory): large enough that per-call overhead is negligible, small enough to
# be invisible next to any real model.
READ_CHUNK_BYTES = 4 << 20

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit



class SafetensorsFile:
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
            if dtype_name not in ST_DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype_name!r}, which is not "
                                 f"supported; expected one of {sorted(ST_DTYPES)}")
            dtype = ST_DTYPES[dtype_name]
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


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors) -> int:
    """Write a safetensors file from `specs` (name, dtype, shape), in that order, taking each tensor's
    data from the iterator `tensors` (one tensor per spec, produced only when it is written, so a
    whole shard never has to exist in memory). Returns the bytes of tensor data written.

    The header is fixed before any data is known, which is why dtypes and shapes come first.
    """
    header, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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


class Staging:
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


def read_rows(file: SafetensorsFile, f, name: str, dest: torch.Tensor, staging: Staging, first_row: int = 0) -> None:
    """Copy rows [first_row, first_row + dest.shape[0]) of checkpoint tensor `name` into `dest`
    (the whole tensor when first_row is 0 and dest has its shape; a 0-d tensor is one row),
    converting dtype chunk by chunk. `f` is the file opened 'rb'."""
    src_dtype, shape = file.dtype(name), file.shape(name)
    row = math.prod(shape[1:]) if shape else 1                    # elements per row of dim 0
    assert dest.is_contiguous(), f"{name}: parameters are expected to be contiguous"
    assert dest.numel() % max(row, 1) == 0 and tuple(dest.shape[1:]) == tuple(shape[1:]), \
        f"{name}: destination {tuple(dest.shape)} is not a block of rows of {shape}"
    start = first_row * row
    if dest.device.type == "cpu" and dest.dtype == src_dtype:
        file.read_into(f, name, dest, start)  # straight into the parameter: no extra copy at all
        return
    flat = dest.view(-1)
    step = max(1, READ_CHUNK_BYTES // src_dtype.itemsize)
    for offset in range(0, flat.numel(), step):
        n = min(step, flat.numel() - offset)
        buf = staging.get(n, src_dtype)
        file.read_into(f, name, buf, start + offset)
        flat[offset:offset + n].copy_(buf)  # blocking: the next read reuses the buffer


def read_fp8_rows(file: SafetensorsFile, f, name: str, scale_inv: torch.Tensor, block: tuple[int, int],
                  dest: torch.Tensor, staging: Staging, first_row: int = 0) -> None:
    """Dequantise rows [first_row, first_row + dest.shape[0]) of the block-quantised FP8 weight
    `name` [O, I] into `dest`: groups of rows, each dequantised in fp32 with its rows' scales
    (scale row = global row // b0, so a shard need not start on a block) and cast to dest's dtype."""
    b0, b1 = block
    rows, cols = dest.shape
    src_dtype = file.dtype(name)
    group = max(b0, READ_CHUNK_BYTES // max(1, 4 * cols) // b0 * b0)  # rows per chunk
    scale_inv = scale_inv.float()
    for r0 in range(0, rows, group):
        r1 = min(rows, r0 + group)
        g0, g1 = first_row + r0, first_row + r1                          # global rows
        w = staging.get((r1 - r0) * cols, src_dtype).view(r1 - r0, cols)
        file.read_into(f, name, w, g0 * cols)
        # dequantised where the weight lives (on a GPU, the multiply is cheap there); fp32 products
        # are exact IEEE operations, so the values do not depend on the device
        w = w.to(dest.device)
        s = scale_inv[g0 // b0: math.ceil(g1 / b0)].to(dest.device)       # [rb, ceil(I/b1)]
        s = s.repeat_interleave(b0, 0)[g0 % b0: g0 % b0 + (r1 - r0)].repeat_interleave(b1, 1)[:, :cols]  # [r, I]
        dest[r0:r1].copy_(w.float() * s)
