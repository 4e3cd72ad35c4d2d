"""SAM's encoder at paper shapes (issue 20, item 3; item 2's LayerNorm2d): msmedcap's SamEncoder runs
segment-anything's attention through ``scaled_dot_product_attention`` with the decomposed relative-position
bias as the mask (msmedcap/models/sam_patches.py) and its LayerNorm2d in fp32, and may split a batch into
``model.sam.encoder_chunk`` images per call. Reference: segment-anything 1.0's own modules,
``segment_anything/modeling/image_encoder.py`` (``ImageEncoderViT``, ``Attention.forward``,
``add_decomposed_rel_pos``, ``get_rel_pos``) and ``segment_anything/modeling/common.py`` (``LayerNorm2d``)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from msmedcap.config import SamConfig
from msmedcap.models import sam_patches
from msmedcap.models.encoders import SamEncoder
from helpers.model_kit import one_thread
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention


_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


# segment-anything's vit_b geometry at 1024 px (patch 16: a 64 x 64 global grid, 14 x 14 windows with
# padding to 70 x 70), narrowed and shortened: one windowed block, then one global block.
ENCODER_1024 = dict(embed_dim=96, depth=2, num_heads=2, patch_size=16, out_chans=32, window_size=14,
                    global_attn_indexes=[1])


def sam_encoder_1024(**cfg) -> SamEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        enc = SamEncoder(SamConfig(type="tiny", image_size=1024, encoder=dict(ENCODER_1024), **cfg))
    # segment-anything zero-initialises the rel-pos tables: random ones, so the bias is exercised
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in enc.encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    return enc.freeze(torch.float32)


@pytest.fixture(scope="module")
def encoder_1024():
    return sam_encoder_1024()


def stock_copy(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """The same weights with segment-anything's own forwards (instance overrides dropped)."""
    stock = copy.deepcopy(encoder)
    for m in stock.modules():
        m.__dict__.pop("forward", None)
    return stock


def test_sdpa_encoder_equals_segment_anythings_at_1024px(encoder_1024):
    """Two images at 1024 px through msmedcap's SamEncoder vs segment-anything's ImageEncoderViT with the
    same weights: equal within fp32 tolerance, and the attention actually depends on the rel-pos tables."""
    attns = [m for m in encoder_1024.encoder.modules() if isinstance(m, Attention)]
    norms = [m for m in encoder_1024.encoder.modules() if isinstance(m, LayerNorm2d)]
    assert len(attns) == 2 and len(norms) == 2  # the windowed and the global block; the neck's two norms
    assert all(m.forward.__func__ is sam_patches.sdpa_attention_forward for m in attns)
    assert all(m.forward.__func__ is sam_patches.layer_norm_2d_fp32 for m in norms)
    images = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    stock = stock_copy(encoder_1024.encoder)
    assert not any("forward" in m.__dict__ for m in stock.modules() if isinstance(m, (Attention, LayerNorm2d)))
    with torch.no_grad():
        want = stock(images)
        got = encoder_1024.encoder(images)
        tokens = encoder_1024(images)
    assert got.shape == want.shape == (2, 32, 64, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, got.flatten(2))  # the channels layout: 32 tokens of 64 x 64
    # the global block's attention alone, on a 64 x 64 grid: equal, and not equal without its rel-pos bias
    glob = encoder_1024.encoder.blocks[1].attn
    x = torch.randn(2, 64, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = stock.blocks[1].attn(x)
        torch.testing.assert_close(glob(x), ref, rtol=1e-4, atol=1e-5)
        no_rel = copy.deepcopy(glob)
        no_rel.use_rel_pos = False
        assert (no_rel(x) - ref).abs().max() > 1e-2


def test_layer_norm_2d_in_fp16_stays_finite_above_256():
    """Channel deviations of ~1000 square past fp16's 65504 in segment-anything's LayerNorm2d: the variance
    is inf and every position normalises to 0 (the output is the bias alone); msmedcap's equals the fp32
    computation rounded to fp16, and in fp32 it is segment-anything's bit for bit."""
    g = torch.Generator().manual_seed(4)
    norm = LayerNorm2d(8)
    with torch.no_grad():
        norm.weight.copy_((torch.rand(8, generator=g) + 0.5).half())
        norm.bias.copy_(torch.randn(8, generator=g).half())
    stock, patched = copy.deepcopy(norm), sam_patches.install(copy.deepcopy(norm))
    x = (torch.randn(2, 8, 5, 5, generator=g) * 1000 + 50).half().float()  # fp16-representable inputs
    assert (x - x.mean(1, keepdim=True)).abs().max() > 256
    with torch.no_grad():
        want = stock(x)
        assert torch.equal(patched(x), want)  # fp32: segment-anything's operations, bit for bit
        overflowed = stock.half()(x.half())  # segment-anything in fp16: the variance is inf, x / inf = 0
        got = patched.half()(x.half())
    assert torch.equal(overflowed, stock.bias.view(1, 8, 1, 1).expand_as(overflowed))  # the bias alone
    assert got.dtype == torch.float16 and got.isfinite().all()
    assert torch.equal(got, want.half())  # fp16-exact inputs and weights: the fp32 computation, rounded once


def test_global_attention_never_holds_the_batchs_scores(encoder_1024, monkeypatch):
    """The largest tensor any op returns in the global block's attention (2 images x 2 heads over 4096
    tokens): segment-anything's scores, rel-pos sums and probabilities are [4, 4096, 4096] each; the SDPA
    path's largest is one bias chunk, here bounded to one (image, head) row by BIAS_ELEMENTS."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    tokens = 4096
    monkeypatch.setattr(sam_patches, "BIAS_ELEMENTS", tokens * tokens)
    attn = encoder_1024.encoder.blocks[1].attn
    x = torch.randn(2, 64, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with Largest() as stock_seen:
            want = stock_copy(attn)(x)
        with Largest() as seen:
            got = attn(x)
    assert stock_seen.numel == 2 * 2 * tokens * tokens
    assert seen.numel == tokens * tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_encoder_chunk_gives_the_same_tokens_as_one_call(encoder_1024, monkeypatch):
    chunked = sam_encoder_1024(encoder_chunk=2)
    assert chunked.chunk == 2
    images = torch.randn(3, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))
    sizes = []
    for enc in (chunked, encoder_1024):
        forward = enc.encoder.forward
        monkeypatch.setattr(enc.encoder, "forward", lambda x, f=forward: sizes.append(len(x)) or f(x))
    with torch.no_grad():
        got, want = chunked(images), encoder_1024(images)
    assert sizes == [2, 1, 3]  # chunked: two calls; the default (0): the whole batch in one
    assert got.shape == (3, 32, 64 * 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_encoder_chunk_is_validated():
    from msmedcap.config import ConfigError, load_config

    assert SamConfig().encoder_chunk == 0
    assert dataclasses.asdict(load_config("demo", ["model.sam.encoder_chunk=4"], check_files=False).model.sam)[
        "encoder_chunk"] == 4
    with pytest.raises(ConfigError, match="^model.sam.encoder_chunk must be >= 0"):
        load_config("demo", ["model.sam.encoder_chunk=-1"], check_files=False)
