"""Per-token log-probabilities (and entropies) of an LM head, without materialising [N, V] logits.

    z       = hidden @ weight.T / temperature                       [N, V]   (never held whole)
    logp[i] = z[i, targets[i]] - logsumexp(z[i])
    ent[i]  = logsumexp(z[i]) - sum_j softmax(z[i])_j * z[i, j]      (nats)

Letters: N tokens, D model width, V vocabulary, C tokens per chunk, Vb vocabulary entries per block.

Both paths (the torch twin and the Triton one) walk the [N, V] logits in [C, Vb] tiles: one tile is
one matmul `hidden[c] @ weight[b].T` whose fp32 accumulator is stored as is (fp32 logits whatever
the inputs' dtype; float64 for float64 inputs), followed by a row-wise pass in fp32. On CUDA the
tile is one cuBLAS GEMM on the 16-bit operands with an fp32 output (torch.mm(..., out_dtype=
torch.float32)); on CPU, which has no mixed-dtype GEMM, the tile's operands are upcast first (exact).
Why not logits in the inputs' dtype: a bf16 logit keeps 8 bits of mantissa, so a logit of size 10
is off by up to 0.03, and that rounding lands in every log-prob; the RL ratio exp(logp - logp_old)
and the KL estimate compare two such log-probs, so it would set their noise floor. The GEMM
accumulates in fp32 anyway; keeping it costs only the tile's bytes (4 per logit instead of 2).

Forward, per token chunk, an online log-sum-exp over the vocabulary blocks (Milakov & Gimelshein,
2018) with, per row, the running max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m), and the
target's logit; at the end lse = m + log s, E[z] = m + a / s and ent = log s - a / s. Keeping
a relative to m makes the entropy a difference of small numbers rather than of two large ones.

Backward, the tiles are recomputed in fp32 (one more matmul, the same logits as the forward's)
and turned into dz:
    d logp[i] / d z[i, j] = [j == targets[i]] - p[i, j]
    d ent[i]  / d z[i, j] = -p[i, j] * (z[i, j] - E[z][i])
    dz = (g_logp * (onehot - p) - g_ent * p * (z - E[z])) / temperature
computed in fp32 and rounded to the inputs' dtype (16-bit operands for the tensor cores; in place
for fp32 inputs), then grad_hidden[c] += dz @ weight[b] and grad_weight[b] += dz.T @ hidden[c],
each product again taken with an fp32 output and summed into fp32 accumulators.
Nothing of size [N, V] is kept between the forward and the backward: only lse and E[z], [N] each.
Cost: 4 matmuls of N*V*D multiply-adds against 3 for the naive path; memory above the inputs is
the gradients plus a few tiles: the fp32 tile (C * Vb <= TILE_ELEMENTS: 64 MiB by default), in the
backward also dz in the inputs' dtype (32 MiB for bf16), and on CPU the upcast operands of one tile.

Returned log-probs and entropies are fp32 whatever the inputs' dtype (float64 for float64 inputs,
so that the twin can be checked with torch.autograd.gradcheck; the Triton kernels compute in fp32
inside); gradients have the inputs' dtypes. Temperature divides the logits (the sampler's
convention), so logp is the log-probability under the tempered distribution that was sampled from.

Triton: the two row-wise passes are kernels (one program per row of the tile, BLOCK_V columns at a
time); the tile offsets row0 and v0 are runtime arguments (not specialised), so a new token count
compiles nothing. On CUDA, BLOCK_V and num_warps are autotuned per (Vb, dtypes) among TILE_CONFIGS;
the interpreter runs the first.

Layout: jit kernels (the two row-wise tile passes), launch configurations, the tile passes (Triton
and torch), the chunk loop shared by both paths, the autograd.Function, the public functions,
compile_specs().
"""
import torch

from kernels.backend import use_triton
from kernels.triton_import import tl, triton
from kernels.tuning import TunedKernel

# default tile: C * Vb <= TILE_ELEMENTS (64 MiB of fp32 logits); Vb <= VOCAB_BLOCK
TILE_ELEMENTS = 1 << 24
VOCAB_BLOCK = 16384


# ---------------------------------------------------------------- jit kernels

@triton.jit(do_not_specialize=["row0", "v0"])
def _lse_tile_kernel(Z, stride_z, TGT, M, S, A, ZT, row0, Vb, v0, inv_temp, BLOCK_V: tl.constexpr):
    """Fold one [C, Vb] tile of raw fp32 logits into the per-row online state (M, S, A, ZT: [N])."""
    r = tl.program_id(0)
    row = (row0 + r).to(tl.int64)
    z_row = Z + r.to(tl.int64) * stride_z
    m = tl.load(M + row).to(tl.float32)
    s = tl.load(S + row).to(tl.float32)
    a = tl.load(A + row).to(tl.float32)
    for start in range(0, Vb, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < Vb
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one real column
        scale = tl.exp(m - m_new)
        zm = tl.where(ok, z - m_new, 0.0)  # padding columns: 0 here, 0 weight below
        e = tl.where(ok, tl.exp(zm), 0.0)
        # a is relative to m: moving the reference from m to m_new adds s * (m - m_new); while s == 0
        # m is still -inf, and 0 * inf must not happen
        shift = s * tl.where(s > 0, m - m_new, 0.0)
        a = scale * (a + shift) + tl.sum(e * zm, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    tl.store(M + row, m)
    tl.store(S + row, s)
    tl.store(A + row, a)
    t = tl.load(TGT + row) - v0
    if (t >= 0) & (t < Vb):
        tl.store(ZT + row, tl.load(z_row + t).to(tl.float32) * inv_temp)


@triton.jit(do_not_specialize=["row0", "v0"])
def _dz_tile_kernel(Z, stride_z, DZ, stride_dz, TGT, LSE, EZ, GLP, GENT, row0, Vb, v0, inv_temp,
                    HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """d(loss)/d(raw logits) of one [C, Vb] tile of raw fp32 logits Z, written to DZ in DZ's dtype
    (DZ may be Z itself: each element is read before it is written, by the same program)."""
    r = tl.program_id(0)
    row = (row0 + r).to(tl.int64)
    z_row = Z + r.to(tl.int64) * stride_z
    dz_row = DZ + r.to(tl.int64) * stride_dz
    lse = tl.load(LSE + row).to(tl.float32)
    ez = tl.load(EZ + row).to(tl.float32)
    glp = tl.load(GLP + row).to(tl.float32)
    gent = 0.0
    if HAS_GENT:
        gent = tl.load(GENT + row).to(tl.float32)
    t = tl.load(TGT + row) - v0
    for start in range(0, Vb, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < Vb
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        dz = tl.where(cols == t, glp, 0.0) - glp * p
        if HAS_GENT:
            dz -= gent * p * (z - ez)
        tl.store(dz_row + cols, (dz * inv_temp).to(DZ.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launch configurations

# one program per row of the tile, BLOCK_V columns per step: (2048, 8 warps) first (the interpreter's)
TILE_CONFIGS = [triton.Config({"BLOCK_V": b}, num_warps=w, num_stages=3) for b, w in ((2048, 8), (1024, 4), (4096, 8),
                                                                                        (4096, 16))]
# the forward pass updates the online state in place and autotune runs it once per configuration:
# the state is restored after each timing run (as is DZ, which may be the tile itself)
_lse = TunedKernel(_lse_tile_kernel, TILE_CONFIGS, key=["Vb"], restore_value=["M", "S", "A"])
_dz = TunedKernel(_dz_tile_kernel, TILE_CONFIGS, key=["Vb", "HAS_GENT"], restore_value=["DZ"])


# ---------------------------------------------------------------- tile passes: Triton and torch

def _lse_tile_triton(z, targets, state, row0, v0, inv_temp):
    m, s, a, zt = state
    _lse((z.shape[0],), z, z.stride(0), targets, m, s, a, zt, row0, z.shape[1], v0, inv_temp)


def _dz_tile_triton(z, dz, targets, lse, ez, g_lp, g_ent, row0, v0, inv_temp):
    _dz((z.shape[0],), z, z.stride(0), dz, dz.stride(0), targets, lse, ez, g_lp, g_ent if g_ent is not None else g_lp,
        row0, z.shape[1], v0, inv_temp, HAS_GENT=g_ent is not None)
    return dz


def _lse_tile_torch(z, targets, state, row0, v0, inv_temp):
    """The spec of _lse_tile_kernel: the same online update, a whole tile at a time. The tile (fp32
    or float64, the state's dtype) is a scratch buffer and is overwritten (in-place passes keep the
    CPU path close to memory speed)."""
    m, s, a, zt = (x[row0:row0 + z.shape[0]] for x in state)  # views into the [N] state
    zs = z                                                     # [C, Vb]
    if inv_temp != 1.0:
        zs.mul_(inv_temp)
    t = targets[row0:row0 + z.shape[0]] - v0
    rows = ((t >= 0) & (t < z.shape[1])).nonzero().squeeze(1)
    target_logit = zs[rows, t[rows]]                           # before zs is shifted below
    m_new = torch.maximum(m, zs.amax(dim=1))                   # [C]
    scale = torch.exp(m - m_new)
    zs.sub_(m_new[:, None])                                    # z - m_new
    e = torch.exp(zs)
    shift = s * torch.where(s > 0, m - m_new, torch.zeros_like(s))  # s == 0 while m = -inf
    a.copy_(scale * (a + shift) + torch.linalg.vecdot(e, zs))  # sum_j e_j (z_j - m_new)
    s.copy_(s * scale + e.sum(dim=1))
    m.copy_(m_new)
    zt[rows] = target_logit


def _dz_tile_torch(z, dz, targets, lse, ez, g_lp, g_ent, row0, v0, inv_temp):
    """The spec of _dz_tile_kernel: dz of the fp32 (or float64) logits tile z, computed in z's place
    and written to dz in dz's dtype (dz may be z itself); returns dz.

    dz = p * (-g_logp - g_ent * (z - E[z])) + g_logp * onehot, all divided by the temperature;
    written as p * (c - g_ent * z) with the per-row constant c = -g_logp + g_ent * E[z].
    """
    rows = slice(row0, row0 + z.shape[0])
    zs = z                                                     # [C, Vb]
    if inv_temp != 1.0:
        zs.mul_(inv_temp)
    g = g_lp[rows] * inv_temp                                  # [C]
    if g_ent is not None:
        ge = g_ent[rows] * inv_temp
        coef = torch.addcmul((ez[rows] * ge - g)[:, None], zs, ge[:, None], value=-1.0)  # c - g_ent * z
        zs.sub_(lse[rows, None]).exp_().mul_(coef)             # p * coef
    else:
        zs.sub_(lse[rows, None]).exp_().mul_(-g[:, None])      # -g_logp * p
    t = targets[rows] - v0
    here = ((t >= 0) & (t < z.shape[1])).nonzero().squeeze(1)
    zs[here, t[here]] += g[here]
    if dz is not z:
        dz.copy_(zs)                                           # rounded to the inputs' dtype
    return dz


# ---------------------------------------------------------------- chunk loop (both paths)

def _chunks(N: int, V: int, chunk_tokens, chunk_vocab) -> tuple[int, int]:
    Vb = min(V, chunk_vocab or VOCAB_BLOCK)
    C = min(max(N, 1), chunk_tokens or max(1, TILE_ELEMENTS // Vb))
    return C, Vb


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The logits tiles' and the accumulators' dtype: fp32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b with out in the accumulator dtype whatever a's and b's: the GEMM's own fp32
    accumulator is stored, never rounded to the operands' dtype."""
    if a.dtype == out.dtype:
        return torch.matmul(a, b, out=out)
    if a.is_cuda:  # cuBLAS: 16-bit operands, fp32 accumulation and output
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return torch.matmul(a.to(out.dtype), b.to(out.dtype), out=out)  # CPU has no mixed-dtype GEMM: upcast (exact)


def _matmul_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product taken in acc's dtype as in _matmul_into."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _logits_tile(buf, h, w):
    """h [c, D] @ w [vb, D].T into the reused fp32 scratch buffer (no fresh [c, vb] allocation per tile)."""
    z = buf[:h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    return _matmul_into(z, h, w.T)


def _forward(hidden, weight, targets, inv_temp, C, Vb, tri):
    N, V = hidden.shape[0], weight.shape[0]
    acc = dict(dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    state = (torch.full((N,), float("-inf"), **acc), torch.zeros(N, **acc), torch.zeros(N, **acc),
             torch.zeros(N, **acc))  # m, s, a, target logit
    tile_pass = _lse_tile_triton if tri else _lse_tile_torch
    buf = torch.empty(min(C, N) * min(Vb, V), **acc)
    for r0 in range(0, N, C):
        h = hidden[r0:r0 + C]                                  # [C, D]
        for v0 in range(0, V, Vb):
            z = _logits_tile(buf, h, weight[v0:v0 + Vb])       # [C, Vb] raw logits, fp32
            tile_pass(z, targets, state, r0, v0, inv_temp)
    m, s, a, zt = state
    lse = m + torch.log(s)
    logp = zt - lse
    ent = torch.log(s) - a / s
    ez = m + a / s
    return logp, ent, lse, ez


def _backward(hidden, weight, targets, lse, ez, g_lp, g_ent, inv_temp, C, Vb, tri):
    N, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    dz_pass = _dz_tile_triton if tri else _dz_tile_torch
    tile = min(C, N) * min(Vb, V)
    buf = torch.empty(tile, dtype=acc, device=hidden.device)
    # dz in the inputs' dtype for the gradient matmuls: its own buffer, or the logits tile itself
    dz_buf = buf if hidden.dtype == acc else torch.empty(tile, dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, N, C):
        h = hidden[r0:r0 + C]                                  # [C, D]
        dh = d_hidden[r0:r0 + C]
        for v0 in range(0, V, Vb):
            w = weight[v0:v0 + Vb]                             # [Vb, D]
            z = _logits_tile(buf, h, w)                        # [C, Vb] fp32
            out = z if dz_buf is buf else dz_buf[:z.numel()].view(z.shape)
            dz = dz_pass(z, out, targets, lse, ez, g_lp, g_ent, r0, v0, inv_temp)  # [C, Vb], inputs' dtype
            _matmul_add(dh, dz, w)                             # [C, D]
            _matmul_add(d_weight[v0:v0 + Vb], dz.T, h)         # [Vb, D]
    return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tri, chunk_tokens, chunk_vocab):
        C, Vb = _chunks(hidden.shape[0], weight.shape[0], chunk_tokens, chunk_vocab)
        inv_temp = 1.0 / temperature
        logp, ent, lse, ez = _forward(hidden, weight, targets, inv_temp, C, Vb, tri)
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.args = (inv_temp, C, Vb, tri)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        inv_temp, C, Vb, tri = ctx.args
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None, None
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(lse.dtype).contiguous()
        g_ent = None if g_ent is None else g_ent.to(lse.dtype).contiguous()
        d_hidden, d_weight = _backward(hidden, weight, targets, lse, ez, g_lp, g_ent, inv_temp, C, Vb, tri)
        return (d_hidden if ctx.needs_input_grad[0] else None, d_weight if ctx.needs_input_grad[1] else None,
                None, None, None, None, None)


# ---------------------------------------------------------------- public functions

def _check(hidden, weight, targets, temperature):
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"token_logprobs: expected hidden [..., D] and weight [V, D]; got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"token_logprobs: targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"token_logprobs: targets must be integer token ids, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"token_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"token_logprobs: targets must lie in [0, {weight.shape[0]}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def _run(hidden, weight, targets, temperature, with_entropy, tri, chunk_tokens, chunk_vocab):
    _check(hidden, weight, targets, temperature)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    logp, ent = _TokenLogprobs.apply(h2, w, t, float(temperature), tri, chunk_tokens, chunk_vocab)
    logp = logp.view(lead)
    return (logp, ent.view(lead)) if with_entropy else logp


def token_logprobs_torch(hidden, weight, targets, temperature=1.0, with_entropy=False, *,
                         chunk_tokens=None, chunk_vocab=None):
    """The torch twin: the same tiles and online log-sum-exp in plain torch (the CPU path).

    hidden [..., D] and weight [V, D] of one float dtype, targets [...] integer ids in [0, V).
    Returns logp [...] fp32, and entropy [...] fp32 (nats) when with_entropy (float64 both for
    float64 inputs). chunk_tokens (C) and chunk_vocab (Vb) set the tile; by default
    Vb = min(V, 16384) and C = 2**24 // Vb.
    """
    return _run(hidden, weight, targets, temperature, with_entropy, False, chunk_tokens, chunk_vocab)


def token_logprobs_triton(hidden, weight, targets, temperature=1.0, with_entropy=False, *,
                          chunk_tokens=None, chunk_vocab=None):
    """The Triton path: the same tiles, with each tile's row-wise pass as one fused kernel."""
    return _run(hidden, weight, targets, temperature, with_entropy, True, chunk_tokens, chunk_vocab)


def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """Log-probabilities of `targets` under softmax(hidden @ weight.T / temperature), never holding [N, V].

    hidden [..., D], weight [V, D] (same dtype), targets [...] in [0, V) -> logp [...] fp32
    (and entropy [...] fp32 when with_entropy; float64 for float64 inputs), from fp32 logits
    whatever the inputs' dtype. Differentiable in hidden and weight.
    The backend follows KERNELS_BACKEND (see kernels.backend).
    """
    if use_triton(hidden):
        return token_logprobs_triton(hidden, weight, targets, temperature, with_entropy)
    return token_logprobs_torch(hidden, weight, targets, temperature, with_entropy)


# ---------------------------------------------------------------- GPU build configurations

def compile_specs(Vb: int = VOCAB_BLOCK):
    """The two tile kernels as launched above, every configuration: the log-sum-exp pass reads fp32
    logits whatever the model's dtype (one build), the dz pass writes dz in fp32/fp16/bf16."""
    specs = _lse.compile_specs("token_logprobs_lse_tile", "fp32", {
        "Z": "*fp32", "stride_z": "i32", "TGT": "*i64", "M": "*fp32", "S": "*fp32", "A": "*fp32", "ZT": "*fp32",
        "row0": "i32", "Vb": "i32", "v0": "i32", "inv_temp": "fp32", "BLOCK_V": "constexpr"}, {})
    for dt in ("fp32", "fp16", "bf16"):
        specs += _dz.compile_specs("token_logprobs_dz_tile", dt, {
            "Z": "*fp32", "stride_z": "i32", "DZ": "*" + dt, "stride_dz": "i32", "TGT": "*i64", "LSE": "*fp32",
            "EZ": "*fp32", "GLP": "*fp32", "GENT": "*fp32", "row0": "i32", "Vb": "i32", "v0": "i32",
            "inv_temp": "fp32", "HAS_GENT": "constexpr", "BLOCK_V": "constexpr"}, {"HAS_GENT": True})
    return specs
