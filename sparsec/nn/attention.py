"""``SparseMultiheadAttention``: ``nn.MultiheadAttention``'s call signature over four projections that
may be sparse, running ``scaled_dot_product_attention``.

``nn.MultiheadAttention`` reads its packed ``in_proj_weight`` and ``out_proj.weight`` itself, so its
linear layers cannot be swapped for sparse ones. This module holds ``q``, ``k``, ``v`` and
``out_proj`` as separate modules (``SparseLinear`` or, where the spec is dense, ``nn.Linear``), so
each has its own spec (``overrides={"*.self_attn.q": ...}``), and accepts what the dense module
accepts (``key_padding_mask``, ``attn_mask`` boolean or additive, ``need_weights``,
``average_attn_weights``, ``is_causal``, ``batch_first``), so ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` run it unchanged (their fused fast path is declined, as for any
attention without a packed projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsec.errors import SparsecError

PROJECTIONS = ("q", "k", "v", "out_proj")


def unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be rebuilt with separate projections (None: it can)."""
    if mha.bias_k is not None or mha.add_zero_attn:
        return "it has add_bias_kv or add_zero_attn"
    return None


def dense_projections(mha: nn.MultiheadAttention) -> dict[str, nn.Linear]:
    """The four projections of ``mha`` as ``nn.Linear`` modules holding copies of its weights."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.detach().split(e)
    else:
        weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
    biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None, None, None)
    out = {}
    for name, w, b in zip(("q", "k", "v"), weights, biases, strict=True):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        out[name] = lin
    src = mha.out_proj
    lin = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None, device=src.weight.device)
    lin = lin.to(src.weight.dtype)
    lin.load_state_dict(src.state_dict())
    out["out_proj"] = lin
    return out


class SparseMultiheadAttention(nn.Module):
    """Multi-head attention whose projections ``q``, ``k``, ``v``, ``out_proj`` are given modules."""

    # what nn.TransformerEncoderLayer reads before its fused path: declined (no packed projection)
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        projections: dict[str, nn.Module],
        dropout: float = 0.0,
        batch_first: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise SparsecError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        for name in PROJECTIONS:
            setattr(self, name, projections[name])

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, build) -> SparseMultiheadAttention:
        """``build(name, linear)`` returns the module that replaces projection ``name`` (``nn.Linear``)."""
        why = unsupported(mha)
        if why is not None:
            raise SparsecError(f"this nn.MultiheadAttention cannot be made sparse: {why}")
        projections = {name: build(name, lin) for name, lin in dense_projections(mha).items()}
        return cls(mha.embed_dim, mha.num_heads, projections, mha.dropout, mha.batch_first)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # unbatched (L, E), as nn.MultiheadAttention accepts
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, batch, _ = query.shape
        src = key.shape[0]

        def heads(x: torch.Tensor, proj: nn.Module, length: int) -> torch.Tensor:
            return proj(x).view(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(query, self.q, tgt), heads(key, self.k, src), heads(value, self.v, src)
        mask = self._mask(attn_mask, key_padding_mask, batch, tgt, src, q.dtype)
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the probabilities themselves: computed explicitly, as the dense module returns them
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if causal:
                scores = scores.masked_fill(torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1), -math.inf)
            elif mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, batch, self.embed_dim))
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _mask(self, attn_mask, key_padding_mask, batch, tgt, src, dtype) -> torch.Tensor | None:
        """One additive mask ``[batch or 1, heads or 1, tgt, src]`` from MultiheadAttention's two (boolean
        True = not allowed, or additive floats)."""

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -math.inf)
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            m = additive(attn_mask)
            mask = m.view(batch, self.num_heads, tgt, src) if m.dim() == 3 else m.view(1, 1, tgt, src)
        if key_padding_mask is not None:
            kp = additive(key_padding_mask).view(batch, 1, 1, src)
            mask = kp if mask is None else mask + kp
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
