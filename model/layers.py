"""The small layers every network in model/ is built from: RMSNorm and the SwiGLU MLP.

Letters: B batch, T tokens, D model dim, I intermediate (hidden) dim of an MLP.

Both are meta-device safe: constructing them under `with torch.device("meta")` allocates nothing,
and `reset_parameters()` (called by the constructors, and again by Transformer.init_weights) sets
the values a fresh model starts from. Parameter names are Hugging Face's on-disk names
(`weight`; `gate_proj`, `up_proj`, `down_proj`), so a checkpoint maps 1:1 onto the module tree.
"""
import torch
import torch.nn.functional as F
from torch import nn

from kernels import rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², dim=-1) + eps) · weight (Zhang & Sennrich, 2019), over the last dim.

    x [..., D] -> y [..., D] in x's dtype; computed in fp32 by kernels.rms_norm (Triton on GPU,
    its torch twin on CPU). weight [D] starts at ones.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm: expected last dim {self.dim}, got input of shape {tuple(x.shape)}")
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class MLP(nn.Module):
    """The SwiGLU feed-forward (Shazeer, 2020) of Llama, Qwen and DeepSeek (dense layers, routed and
    shared experts alike):

        y = W_down (silu(W_gate x) ⊙ W_up x)

    x [..., D] -> y [..., D]; gate_proj and up_proj are [I, D], down_proj [D, I] (nn.Linear layout).
    `bias` adds biases to all three (Llama's mlp_bias).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [..., I] -> [..., D]
