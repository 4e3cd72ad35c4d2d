"""segment-anything's image-encoder forwards replaced by equivalents that fit paper shapes (issue 20).

- ``Attention``: segment-anything (``modeling/image_encoder.py``, ``Attention.forward``) builds the
  scores ``[B*heads, HW, HW]``, adds the decomposed relative-position terms (``add_decomposed_rel_pos``:
  two broadcast adds, each a new tensor of that size) and softmaxes: three such tensors alive at once,
  0.375 GiB each per image in fp16 at 1024 px (4096 tokens, 12 heads). Here the same rel-pos terms
  (``get_rel_pos`` and its ``rel_h``/``rel_w`` einsums) are broadcast-added into an additive bias that
  ``scaled_dot_product_attention`` takes as ``attn_mask``, built for a bounded number of (image, head)
  rows at a time, so neither the scores nor the probabilities of the whole batch ever exist.
- ``LayerNorm2d``: segment-anything (``modeling/common.py``) squares ``x - u`` in the input dtype,
  which overflows fp16 above ~256 (segment-anything issues 540, 696); here it is computed in fp32 and
  cast back, the same operations (bit for bit) when the input is already fp32.

:func:`install` swaps the forwards of a module's instances in place; parameters and state dict stay.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

# Bias elements per scaled_dot_product_attention call: 4 heads at SAM's 64 x 64 global grid (256 MiB
# in fp32, 128 MiB in fp16), whatever the batch; windowed blocks fit ~6 images of 25 windows x 12 heads.
BIAS_ELEMENTS = 1 << 26


def sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` through ``F.scaled_dot_product_attention``."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # [B*heads, HW, C], as segment-anything
    rows, n, dim = q.shape
    if self.use_rel_pos:
        rh, rw = get_rel_pos(h, h, self.rel_pos_h), get_rel_pos(w, w, self.rel_pos_w)
    out = torch.empty_like(q)
    step = max(1, BIAS_ELEMENTS // (n * n))
    for s in range(0, rows, step):
        qs, ks, vs = q[s:s + step], k[s:s + step], v[s:s + step]
        bias = None
        if self.use_rel_pos:  # add_decomposed_rel_pos's terms, from the unscaled q
            r_q = qs.reshape(-1, h, w, dim)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
            bias = qs.new_empty(r_q.shape[0], h, w, h, w)  # contiguous, whatever layout the einsums chose
            torch.add(rel_h[:, :, :, :, None], rel_w[:, :, :, None, :], out=bias)
            bias = bias.view(1, -1, n, n)
        # 4-D: the fused CPU/GPU kernels take [batch, heads, tokens, dim] only
        out[s:s + step] = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=bias,
                                                         scale=self.scale)[0]
        del bias
    x = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(x)


def layer_norm_2d_fp32(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``LayerNorm2d.forward`` in fp32, cast back to the input dtype."""
    y = x.float()  # the input itself when it is fp32: the same ops as segment-anything's
    u = y.mean(1, keepdim=True)
    s = (y - u).pow(2).mean(1, keepdim=True)
    y = (y - u) / torch.sqrt(s + self.eps)
    y = self.weight.float()[:, None, None] * y + self.bias.float()[:, None, None]
    return y.to(x.dtype)


def install(module: nn.Module) -> nn.Module:
    """Every segment-anything ``Attention`` (global and windowed blocks) and ``LayerNorm2d`` in
    ``module`` gets the forward above; returns ``module``."""
    from segment_anything.modeling.common import LayerNorm2d
    from segment_anything.modeling.image_encoder import Attention

    for m in module.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(sdpa_attention_forward, m)
        elif isinstance(m, LayerNorm2d):
            m.forward = types.MethodType(layer_norm_2d_fp32, m)
    return module
