"""The frozen image encoders: open_clip's CLIP vision tower and segment-anything's image encoder.

Both are built through their libraries' own constructors and loaders, kept frozen (no grad, eval
mode that ``model.train()`` cannot undo) and run under ``no_grad``. Each returns a token sequence
``[B, N, C]`` for a Q-Former to cross-attend.
"""
from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from msmedcap.config import ClipConfig, ConfigError, SamConfig, resolve_asset
from msmedcap.data.clip_preprocess import open_clip_name
from msmedcap.data.transforms import ClipTransform, SamTransform
from msmedcap.models import sam_patches

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX. Without them a bf16 GEMM is emulated: measured here (AVX2 EPYC) 0.38
    GFLOP/s against ~75 in fp32, so fp32 is the fast choice on such CPUs."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def frozen_dtype(name: str) -> torch.dtype:
    """``auto`` = fp16 where a GPU is present; on CPU bf16 where it has native bf16, else fp32
    (fp16 matmuls are slow or missing on CPUs)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return DTYPES[name]


@contextmanager
def built_in(dtype: torch.dtype):
    """Modules constructed inside hold their floating parameters and buffers in ``dtype`` from the start:
    torch's default dtype is ``dtype`` (initialisers write it directly), and a parameter or buffer
    registered in another floating dtype (an explicit ``dtype=torch.float32``, a value computed before it is
    registered) is cast as it is registered. So a frozen part built for bf16 never holds a full fp32 copy
    of itself (EVA-g + OPT-2.7B are ~15 GB in fp32); weights loaded into it afterwards are rounded once, as
    the fp32-then-cast build rounded them (equal bit for bit). ``float32`` changes nothing."""
    if dtype == torch.float32 and torch.get_default_dtype() == torch.float32:
        yield
        return
    from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                         register_module_parameter_registration_hook)

    def cast(_module, _name, t):
        if t is None or not t.is_floating_point() or t.dtype == dtype:
            return None
        if isinstance(t, nn.Parameter):
            return nn.Parameter(t.detach().to(dtype), requires_grad=t.requires_grad)
        return t.to(dtype)

    before = torch.get_default_dtype()
    handles = [register_module_parameter_registration_hook(cast), register_module_buffer_registration_hook(cast)]
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
        for h in handles:
            h.remove()


def warn_random(part: str, key: str) -> None:
    """The loud line of a frozen part built without weights (``model.allow_random_weights``)."""
    log.warning("RANDOM WEIGHTS: the frozen %s is random (%s is not set; model.allow_random_weights=true): "
                "what it computes means nothing; for tests and benchmarks only", part, key)


def weights_mismatch(key: str, path, what: str, missing=(), unexpected=(), mismatched=()) -> ConfigError:
    """A ConfigError naming the tensors a weight file lacks, has in excess or has in another shape
    (the first few of each, with counts)."""
    def few(names) -> str:
        names = list(names)
        return ", ".join(map(str, names[:6])) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")

    parts = [f"{len(missing)} missing ({few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
             f"{len(mismatched)} of another shape ({few(mismatched)})" if mismatched else ""]
    return ConfigError(f"{key}: {path} does not provide every tensor of {what}: "
                       + "; ".join(p for p in parts if p) + ". Give the weights of this architecture.")


@contextmanager
def fixed_seed(seed: int = 0):
    """Random-init frozen parts (tiny presets) come out the same in every build, so an export's config
    alone rebuilds them; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _conv_forward_fp32_on_cpu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype != torch.float32:
        bias = None if conv.bias is None else conv.bias.float()
        return conv._conv_forward(x.float(), conv.weight.float(), bias).to(x.dtype)
    return conv._conv_forward(x, conv.weight, conv.bias)


def encoder_input(pixels: torch.Tensor, mean: tuple, std: tuple, dtype: torch.dtype, pad_to: int = 0,
                  sizes: torch.Tensor | None = None, minmax: bool = False) -> torch.Tensor:
    """The encoder's input from the batch's uint8 pixels, on their device: ``[B, H, W, 3]`` (channels
    last, as the loader stacks them) -> ``[B, 3, P, P]`` in ``dtype``, ``((x / 255) - mean) / std``,
    then zero beyond each image's ``sizes[i] = (h, w)`` (the batch's padding) and zero-padded
    bottom/right to ``pad_to`` (SAM's ``Sam.preprocess``). Computed in float32 and rounded once to
    ``dtype``: the same float32 operations as ``msmedcap.data.transforms._lookup``, so equal to the
    float32 tensors the workers used to build (then cast to the encoder's dtype), bit for bit on CPU.
    ``minmax`` (MedSAM): ``(x - min) / max(max - min, 1e-8)`` per image over its pixels and channels instead
    of mean/std, on the uint8 values as MedSAM divides them."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"encoder_input: expected uint8 [B, H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    b, h, w, _ = pixels.shape
    dev = pixels.device
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    # channels first before the arithmetic: on the channels-last view every op broadcasts mean/std along
    # the innermost dimension (3 wide), a slow path on CPU (2.3 -> 0.7 ms for 8 SAM inputs of 128 px
    # here); the same float32 operations either way, element by element
    if minmax:  # MedSAM squashes to the full square: every row is all image, no batch padding inside it
        x = _min_max(pixels.permute(0, 3, 1, 2).contiguous())
    else:
        x = pixels.permute(0, 3, 1, 2).contiguous().float().div_(255).sub_(m).div_(s)
    if sizes is not None:
        sizes = sizes.to(dev)
        rows = torch.arange(h, device=dev).view(1, h, 1) < sizes[:, 0].view(b, 1, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w) < sizes[:, 1].view(b, 1, 1)
        x = x.masked_fill_(~(rows & cols).unsqueeze(1), 0.0)
    if pad_to and (h < pad_to or w < pad_to):
        x = nn.functional.pad(x, (0, max(pad_to - w, 0), 0, max(pad_to - h, 0)))
    return x.to(dtype, memory_format=torch.contiguous_format)


def _min_max(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, ...]`` -> float32, ``(x - min) / max(max - min, 1e-8)`` per image, as MedSAM computes it (float64
    division, then float32: ``msmedcap.data.transforms._min_max``), through a 256-entry table per image."""
    b = pixels.shape[0]
    flat = pixels.reshape(b, -1)
    low, high = flat.amin(dim=1).double(), flat.amax(dim=1).double()
    values = torch.arange(256, dtype=torch.float64, device=pixels.device)
    table = ((values[None] - low[:, None]) / (high - low).clamp(min=1e-8)[:, None]).float()
    out = torch.empty(flat.shape, dtype=torch.float32, device=pixels.device)
    for i in range(b):  # one image's int64 indices at a time (25 MB at 1024 px), not the batch's
        out[i] = table[i][flat[i].long()]
    return out.view(pixels.shape)


class FrozenEncoder(nn.Module):
    """Base of the frozen parts: parameters without grad and eval mode that ``train()`` cannot undo.

    Input (the one place where images become encoder inputs, :meth:`prepare`): the batch's uint8
    pixels ``[B, H, W, 3]`` with their sizes ``[B, 2]`` (normalised with the encoder's mean/std and
    zero-padded to its input size, on the pixels' device, in the encoder's dtype), or a floating
    ``[B, 3, H, W]`` tensor taken as already normalised (synthetic benchmark batches, the demo
    encoders' own training)."""

    width: int  # channels of each output token
    num_tokens: int
    transform = None  # the msmedcap.data.transforms object of this encoder's geometry and statistics
    pad_to = 0  # SAM: inputs are zero-padded to a square of this side

    def freeze(self, dtype: torch.dtype) -> "FrozenEncoder":
        self.requires_grad_(False)
        self.to(dtype)
        # CPU bf16/fp16 convolutions take a slow path (patch embedding: 98 ms in bf16 vs 7.5 ms in fp32
        # here); the few convolutions compute in fp32 there, everything else stays in ``dtype``.
        for module in self.modules():
            if type(module) is nn.Conv2d:
                module.forward = types.MethodType(_conv_forward_fp32_on_cpu, module)
        return super().train(False)

    def train(self, mode: bool = True):  # frozen: dropout/drop-path stay off whatever the parent says
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def prepare(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype == torch.uint8:
            t = self.transform
            return encoder_input(images, t.mean, t.std, self.dtype, self.pad_to, sizes, getattr(t, "minmax", False))
        return images.to(self.dtype)

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.tokens(self.prepare(images, sizes))


# --------------------------------------------------------------------------- CLIP
class ClipEncoder(FrozenEncoder):
    """open_clip vision tower cut after ``feature_layer`` (BLIP-2 takes the penultimate block's tokens,
    class token included: EVA01-g-14 at 224 gives 257 x 1408). Blocks after it are removed."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        import open_clip

        name = open_clip_name(cfg.name)
        pretrained = resolve_asset(cfg.pretrained) if cfg.pretrained else None  # a tag, a file, a pkg:// file
        try:
            clip = open_clip.create_model(name, pretrained=pretrained, force_image_size=cfg.image_size,
                                          device=torch.empty(0).device)  # follows torch.device("meta") contexts
        except (RuntimeError, AssertionError, KeyError) as e:
            if not pretrained:
                raise
            # open_clip loads a pretrained file strictly (load_checkpoint(strict=True)): torch's message lists
            # every missing / unexpected / misshapen tensor
            lists = _state_dict_error_lists(str(e))
            if any(lists):
                raise weights_mismatch("model.clip.pretrained", cfg.pretrained, f"open_clip {cfg.name} at image_size "
                                       f"{cfg.image_size}", *lists) from e
            raise ConfigError(f"model.clip.pretrained: {cfg.pretrained} does not load into model.clip.name="
                              f"{cfg.name} at image_size {cfg.image_size}: {str(e)[:500]}") from e
        visual = clip.visual
        trunk = getattr(visual, "trunk", None)  # timm towers (EVA) are wrapped: visual.trunk
        blocks = trunk.blocks if trunk is not None else visual.transformer.resblocks
        depth = len(blocks)
        layer = cfg.feature_layer + depth if cfg.feature_layer < 0 else cfg.feature_layer
        if not 0 <= layer < depth:
            raise ConfigError(f"model.clip.feature_layer={cfg.feature_layer}: {name} has {depth} blocks")
        if trunk is not None:
            trunk.prune_intermediate_layers([layer], prune_norm=True, prune_head=True)
            visual.head = nn.Identity()
            self.width = trunk.embed_dim
        else:
            visual.prune_intermediate_layers([layer], prune_norm=True, prune_head=True)
            self.width = visual.transformer.width
        self.visual, self.layer = visual, layer
        size = visual.image_size if trunk is None else trunk.patch_embed.img_size
        patch = visual.patch_size if trunk is None else trunk.patch_embed.patch_size
        self.num_tokens = 1 + (size[0] // patch[0]) * (size[1] // patch[1])
        self.transform = ClipTransform.from_config(cfg)
        _check_preprocess(cfg.name, self.transform, open_clip.get_model_preprocess_cfg(clip))
        del clip  # the text tower is never used

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(images, indices=[self.layer], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC",
                                                output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


def _check_preprocess(name: str, transform: ClipTransform, built: dict) -> None:
    """The transform the loader resolved (msmedcap.data.clip_preprocess) is the one open_clip set on the
    model it built: a difference would feed the encoder images it was not made for."""
    from open_clip.utils import to_2tuple

    mine = {"size": to_2tuple(transform.size), "mean": transform.mean, "std": transform.std,
            "bicubic": transform.bicubic, "resize_mode": transform.resize_mode, "fill_color": transform.fill_color}
    def triple(v) -> tuple:  # open_clip's image_transform takes one number for all channels
        return tuple(float(x) for x in ((v,) * 3 if isinstance(v, (int, float)) else v))

    theirs = {"size": to_2tuple(built["size"]), "mean": triple(built["mean"]), "std": triple(built["std"]),
              "bicubic": built.get("interpolation", "bicubic") != "bilinear",
              "resize_mode": built.get("resize_mode", "shortest"), "fill_color": built.get("fill_color", 0)}
    if mine != theirs:
        raise ConfigError(f"model.clip.name: {name}: the preprocessing resolved for the loader {mine} differs from "
                          f"the one open_clip set on the built model {theirs}")


def _state_dict_error_lists(message: str) -> tuple:
    """(missing, unexpected, mismatched) tensor names of torch's ``load_state_dict`` error message."""
    import re

    def names(label: str) -> list:
        m = re.search(label + r" key\(s\) in state_dict: (.*?)\.\s*(\n|$)", message)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []

    mismatched = re.findall(r"size mismatch for ([^:]+):", message)
    return names("Missing"), names("Unexpected"), mismatched


# --------------------------------------------------------------------------- SAM
TINY_SAM_DEFAULTS = dict(embed_dim=64, depth=2, num_heads=2, patch_size=16, out_chans=32,
                         global_attn_indexes=(1,), window_size=4)


def build_sam_tiny(image_size: int = 128, checkpoint: str | None = None, **encoder):
    """A tiny ``Sam`` built as segment-anything's ``_build_sam`` builds vit_b/l/h (same classes:
    ImageEncoderViT, PromptEncoder, MaskDecoder with a TwoWayTransformer), with ``encoder``'s
    ImageEncoderViT kwargs over TINY_SAM_DEFAULTS and the prompt/decoder width = the encoder's
    ``out_chans`` (SAM: 256). ``checkpoint``: a full-model state dict, read with weights_only=True."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    kwargs = {**TINY_SAM_DEFAULTS, **encoder}
    kwargs["global_attn_indexes"] = tuple(kwargs["global_attn_indexes"])
    dim, grid = kwargs["out_chans"], image_size // kwargs["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=image_size, mlp_ratio=4, qkv_bias=True, use_rel_pos=True,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=4 * dim,
                                                               num_heads=2),
                                 transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(resolve_asset(checkpoint), map_location="cpu", weights_only=True))
    return sam


SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")  # a full Sam's state dict


def load_sam_state(path: str, with_extra: bool = False):
    """A SAM ``.pth`` (full model or image encoder only; a ``pkg://`` path is a packaged asset), read
    with ``weights_only=True``, as the image encoder's state dict. ``with_extra``: also the names of a
    full model's tensors that are neither image encoder, prompt encoder nor mask decoder (unexpected)."""
    path = resolve_asset(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file (torch's legacy format cannot be mapped)
        state = None
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise ConfigError(f"model.sam.checkpoint: cannot read {path}: {e}") from e
    if state is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model.sam.checkpoint: cannot read {path}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.sam.checkpoint: {path} is not a state dict")
    prefix = "image_encoder."
    extra = []
    if any(k.startswith(prefix) for k in state):
        extra = sorted(k for k in state if not k.startswith(SAM_PARTS))
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return (state, extra) if with_extra else state


class SamEncoder(FrozenEncoder):
    """segment-anything's ``ImageEncoderViT`` (the registry's vit_b/l/h, or ``tiny`` from
    :func:`build_sam_tiny` with ``cfg.encoder``). Output ``[B, C, H, W]`` (256 x 64 x 64 for SAM)
    becomes tokens: ``channels`` = C tokens of H*W (the reference implementation), ``spatial`` = H*W
    tokens of C."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        from segment_anything import sam_model_registry

        if cfg.type == "tiny":
            self.encoder = build_sam_tiny(cfg.image_size, **cfg.encoder).image_encoder
        else:
            if cfg.encoder:
                raise ConfigError("model.sam.encoder overrides are for type 'tiny'; "
                                  f"{cfg.type} is built by segment-anything's registry")
            if cfg.image_size != 1024:
                raise ConfigError(f"model.sam.image_size: SAM {cfg.type} takes 1024, got {cfg.image_size}")
            self.encoder = sam_model_registry[cfg.type](checkpoint=None).image_encoder
        if cfg.checkpoint:
            state, extra = load_sam_state(cfg.checkpoint, with_extra=True)
            mine = self.encoder.state_dict()
            missing = [k for k in mine if k not in state]
            unexpected = extra + [f"image_encoder.{k}" for k in state if k not in mine]
            mismatched = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in state.items()
                          if k in mine and v.shape != mine[k].shape]
            if missing or unexpected or mismatched:
                raise weights_mismatch("model.sam.checkpoint", cfg.checkpoint, f"model.sam.type={cfg.type}'s image "
                                       f"encoder (image_size {cfg.image_size}, encoder {cfg.encoder})",
                                       missing, unexpected, mismatched)
            self.encoder.load_state_dict(state)  # strict; each tensor rounded once to the encoder's dtype
            log.info("SAM %s image encoder loaded from %s", cfg.type, cfg.checkpoint)
        grid = self.encoder.img_size // self.encoder.patch_embed.proj.kernel_size[0]
        chans = self.encoder.neck[0].out_channels
        self.layout = cfg.token_layout
        self.transform, self.pad_to = SamTransform(self.encoder.img_size, cfg.preprocess), self.encoder.img_size
        self.width, self.num_tokens = (grid * grid, chans) if self.layout == "channels" else (chans, grid * grid)
        self.chunk = cfg.encoder_chunk
        sam_patches.install(self.encoder)  # SDPA attention, fp32 LayerNorm2d: same outputs, paper shapes fit

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        if self.chunk and images.shape[0] > self.chunk:  # bounds each call's activations
            x = torch.cat([self.encoder(c) for c in images.split(self.chunk)])
        else:
            x = self.encoder(images)
        x = x.flatten(2)  # [B, C, H*W]
        return x if self.layout == "channels" else x.transpose(1, 2)
