"""Activation checkpointing of transformers layers, whatever the module's train/eval mode.

transformers' own switch (``gradient_checkpointing_enable``) acts only in training mode, and the
frozen LM stays in eval mode (no dropout) while the stage-2 gradient crosses it; so each layer's
forward is wrapped here instead. Non-reentrant (``use_reentrant=False``): tensors a layer hands out
through hooks (the Q-Former's query keys/values that ITG reuses) keep their gradient path, and
dropout masks are replayed from the saved RNG state.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer


def _recomputed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)  # no backward to replay for: generation, no_grad evaluation


def checkpoint_layers(module: nn.Module) -> int:
    """Every transformers layer (``GradientCheckpointingLayer``) inside ``module`` keeps only its
    inputs and recomputes its activations in the backward. Returns how many layers; idempotent."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            if "forward" not in vars(layer):
                layer.forward = functools.partial(_recomputed, layer.forward)
            count += 1
    return count
