"""Per-token log-probabilities (and entropies) of an LM head, without materialising [N, V] logits.

    z       = hidden @ weight.T / temperature                       [N, V]   (never held whole)
    logp[i] = z[i, targets[i]] - logsumexp(z[i])
    ent[i]  = logsumexp(z[i]) - sum_j softmax(z[i])_j * z[i, j]      (nats)

Letters: N tokens, D model width, V vocabulary, C tokens per chunk, Vb vocabulary entries per block.

Both paths (the torch twin and the Triton one) walk the [N, V] logits in [C, Vb] tiles: one tile is
one matmul `hidden[c] @ weight[b].T` in the inputs' dtype, followed by a row-wise pass in fp32.

Forward, per token chunk, an online log-sum-exp over the vocabulary blocks (Milakov & Gimelshein,
2018) with, per row, the running max m, s = sum exp(z - m), a = sum exp(z - m) * (z - m), and the
target's logit; at the end lse = m + log s, E[z] = m + a / s and ent = log s - a / s. Keeping
a relative to m makes the entropy a difference of small numbers rather than of two large ones.

Backward, the tiles are recomputed (one more matmul) and turned into dz in place:
    d logp[i] / d z[i, j] = [j == targets[i]] - p[i, j]
    d ent[i]  / d z[i, j] = -p[i, j] * (z[i, j] - E[z][i])
    dz = (g_logp * (onehot - p) - g_ent * p * (z - E[z])) / temperature
then grad_hidden[c] += dz @ weight[b] and grad_weight[b] += dz.T @ hidden[c] (fp32 accumulators).
Nothing of size [N, V] is kept between the forward and the backward: only lse and E[z], [N] each.
Cost: 4 matmuls of N*V*D multiply-adds against 3 for the naive path; memory above the inputs is
the gradients plus a few tiles (about 64 MiB each in fp32 by default).

Returned log-probs and entropies are fp32 whatever the inputs' dtype; gradients have the inputs'
dtypes. Temperature divides the logits (the sampler's convention), so logp is the log-probability
under the tempered distribution that was sampled from.

Layout: jit kernels (the two row-wise tile passes), host launchers, the chunk loop shared by both
paths, the autograd.Function, the public functions, compile_specs().
"""
import torch

from kernels.backend import use_triton
from kernels.compile_spec import CompileSpec
from kernels.triton_import import tl, triton

# default tile: C * Vb <= TILE_ELEMENTS (64 MiB of fp32 logits); Vb <= VOCAB_BLOCK
TILE_ELEMENTS = 1 << 24
VOCAB_BLOCK = 16384


# ---------------------------------------------------------------- jit kernels

@triton.jit
def _lse_tile_kernel(Z, stride_z, TGT, M, S, A, ZT, row0, Vb, v0, inv_temp, BLOCK_V: tl.constexpr):
    """Fold one [C, Vb] tile of raw logits into the per-row online state (M, S, A, ZT: [N] fp32)."""
    r = tl.program_id(0)
    row = (row0 + r).to(tl.int64)
    z_row = Z + r.to(tl.int64) * stride_z
    m = tl.load(M + row)
    s = tl.load(S + row)
    a = tl.load(A + row)
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


@triton.jit
def _dz_tile_kernel(Z, stride_z, TGT, LSE, EZ, GLP, GENT, row0, Vb, v0, inv_temp,
                    HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite one [C, Vb] tile of raw logits with d(loss)/d(raw logits), in the tile's dtype."""
    r = tl.program_id(0)
    row = (row0 + r).to(tl.int64)
    z_row = Z + r.to(tl.int64) * stride_z
    lse = tl.load(LSE + row)
    ez = tl.load(EZ + row)
    glp = tl.load(GLP + row)
    gent = 0.0
    if HAS_GENT:
        gent = tl.load(GENT + row)
    t = tl.load(TGT + row) - v0
    for start in range(0, Vb, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < Vb
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        dz = tl.where(cols == t, glp, 0.0) - glp * p
        if HAS_GENT:
            dz -= gent * p * (z - ez)
        tl.store(z_row + cols, (dz * inv_temp).to(Z.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- tile passes: Triton and torch

def _block_v(Vb: int) -> int:
    return min(triton.next_power_of_2(Vb), 2048)


def _lse_tile_triton(z, targets, state, row0, v0, inv_temp):
    m, s, a, zt = state
    _lse_tile_kernel[(z.shape[0],)](z, z.stride(0), targets, m, s, a, zt, row0, z.shape[1], v0, inv_temp,
                                    BLOCK_V=_block_v(z.shape[1]), num_warps=8)


def _dz_tile_triton(z, targets, lse, ez, g_lp, g_ent, row0, v0, inv_temp):
    _dz_tile_kernel[(z.shape[0],)](z, z.stride(0), targets, lse, ez, g_lp, g_ent if g_ent is not None else g_lp,
                                   row0, z.shape[1], v0, inv_temp, HAS_GENT=g_ent is not None,
                                   BLOCK_V=_block_v(z.shape[1]), num_warps=8)
    return z


def _lse_tile_torch(z, targets, state, row0, v0, inv_temp):
    """The spec of _lse_tile_kernel: the same online update, a whole tile at a time. The tile is a
    scratch buffer and is overwritten (in-place passes keep the CPU path close to memory speed)."""
    m, s, a, zt = (x[row0:row0 + z.shape[0]] for x in state)  # views into the [N] state
    zs = z if z.dtype == torch.float32 else z.float()          # [C, Vb]
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


def _dz_tile_torch(z, targets, lse, ez, g_lp, g_ent, row0, v0, inv_temp):
    """The spec of _dz_tile_kernel: overwrites the tile z with dz (in z's dtype) and returns it.

    dz = p * (-g_logp - g_ent * (z - E[z])) + g_logp * onehot, all divided by the temperature;
    written as p * (c - g_ent * z) with the per-row constant c = -g_logp + g_ent * E[z].
    """
    rows = slice(row0, row0 + z.shape[0])
    zs = z if z.dtype == torch.float32 else z.float()          # [C, Vb]
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
    if zs is not z:
        z.copy_(zs)
    return z


# ---------------------------------------------------------------- chunk loop (both paths)

def _chunks(N: int, V: int, chunk_tokens, chunk_vocab) -> tuple[int, int]:
    Vb = min(V, chunk_vocab or VOCAB_BLOCK)
    C = min(max(N, 1), chunk_tokens or max(1, TILE_ELEMENTS // Vb))
    return C, Vb


def _logits_tile(buf, h, w):
    """h [c, D] @ w [vb, D].T into the reused scratch buffer (no fresh [c, vb] allocation per tile)."""
    z = buf[:h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    return torch.matmul(h, w.T, out=z)


def _forward(hidden, weight, targets, inv_temp, C, Vb, tri):
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    state = (torch.full((N,), float("-inf"), **f32), torch.zeros(N, **f32), torch.zeros(N, **f32),
             torch.zeros(N, **f32))  # m, s, a, target logit
    tile_pass = _lse_tile_triton if tri else _lse_tile_torch
    buf = torch.empty(min(C, N) * min(Vb, V), dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, N, C):
        h = hidden[r0:r0 + C]                                  # [C, D]
        for v0 in range(0, V, Vb):
            z = _logits_tile(buf, h, weight[v0:v0 + Vb])       # [C, Vb] raw logits, inputs' dtype
            tile_pass(z, targets, state, r0, v0, inv_temp)
    m, s, a, zt = state
    lse = m + torch.log(s)
    logp = zt - lse
    ent = torch.log(s) - a / s
    ez = m + a / s
    return logp, ent, lse, ez


def _backward(hidden, weight, targets, lse, ez, g_lp, g_ent, inv_temp, C, Vb, tri):
    N, V = hidden.shape[0], weight.shape[0]
    acc = torch.float32
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    dz_pass = _dz_tile_triton if tri else _dz_tile_torch
    same = hidden.dtype == acc
    buf = torch.empty(min(C, N) * min(Vb, V), dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, N, C):
        h = hidden[r0:r0 + C]                                  # [C, D]
        dh = d_hidden[r0:r0 + C]
        for v0 in range(0, V, Vb):
            w = weight[v0:v0 + Vb]                             # [Vb, D]
            dz = dz_pass(_logits_tile(buf, h, w), targets, lse, ez, g_lp, g_ent, r0, v0, inv_temp)  # [C, Vb]
            if same:  # fp32: accumulate straight into the gradients
                dh.addmm_(dz, w)
                d_weight[v0:v0 + Vb].addmm_(dz.T, h)
            else:     # low precision matmuls, fp32 accumulators
                dh += dz @ w
                d_weight[v0:v0 + Vb] += (dz.T @ h).float()
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
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
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
    Returns logp [...] fp32, and entropy [...] fp32 (nats) when with_entropy. chunk_tokens (C) and
    chunk_vocab (Vb) set the tile; by default Vb = min(V, 16384) and C = 2**24 // Vb.
    """
    return _run(hidden, weight, targets, temperature, with_entropy, False, chunk_tokens, chunk_vocab)


def token_logprobs_triton(hidden, weight, targets, temperature=1.0, with_entropy=False, *,
                          chunk_tokens=None, chunk_vocab=None):
    """The Triton path: the same tiles, with each tile's row-wise pass as one fused kernel."""
    return _run(hidden, weight, targets, temperature, with_entropy, True, chunk_tokens, chunk_vocab)


def token_logprobs(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """Log-probabilities of `targets` under softmax(hidden @ weight.T / temperature), never holding [N, V].

    hidden [..., D], weight [V, D] (same dtype), targets [...] in [0, V) -> logp [...] fp32
    (and entropy [...] fp32 when with_entropy). Differentiable in hidden and weight.
    The backend follows KERNELS_BACKEND (see kernels.backend).
    """
    if use_triton(hidden):
        return token_logprobs_triton(hidden, weight, targets, temperature, with_entropy)
    return token_logprobs_torch(hidden, weight, targets, temperature, with_entropy)


# ---------------------------------------------------------------- GPU build configurations

def compile_specs(Vb: int = VOCAB_BLOCK):
    """The two tile kernels as launched above, for logits in fp32/fp16/bf16."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        specs.append(CompileSpec("token_logprobs_lse_tile", dt, _lse_tile_kernel,
                                 {"Z": "*" + dt, "stride_z": "i32", "TGT": "*i64", "M": "*fp32", "S": "*fp32",
                                  "A": "*fp32", "ZT": "*fp32", "row0": "i32", "Vb": "i32", "v0": "i32",
                                  "inv_temp": "fp32", "BLOCK_V": "constexpr"},
                                 {"BLOCK_V": _block_v(Vb)}, num_warps=8))
        specs.append(CompileSpec("token_logprobs_dz_tile", dt, _dz_tile_kernel,
                                 {"Z": "*" + dt, "stride_z": "i32", "TGT": "*i64", "LSE": "*fp32", "EZ": "*fp32",
                                  "GLP": "*fp32", "GENT": "*fp32", "row0": "i32", "Vb": "i32", "v0": "i32",
                                  "inv_temp": "fp32", "HAS_GENT": "constexpr", "BLOCK_V": "constexpr"},
                                 {"HAS_GENT": True, "BLOCK_V": _block_v(Vb)}, num_warps=8))
    return specs
