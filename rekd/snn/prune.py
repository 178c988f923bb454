"""One-shot global magnitude pruning of every convolution weight (paper Eq. 3: W_pruned = W * M)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from rekd.snn.models import conv_layers


def magnitude_prune(model: nn.Module, prune_ratio: float, *, permanent: bool = True) -> float:
    """Zero the `prune_ratio` share of conv weights with the smallest |w|, ranked across all convs at once.

    Batch norm, linear and other parameters are untouched; ratio 0 leaves the model as it is. With
    `permanent` the mask is folded into the weights (no forward hook left behind, as a frozen teacher
    wants); otherwise torch's `weight_orig` / `weight_mask` reparametrisation stays. Returns the share
    of conv weights that are zero afterwards.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio={prune_ratio} must satisfy 0 <= prune_ratio < 1")
    convs = conv_layers(model)
    if not convs:
        raise ValueError("magnitude_prune: the model has no convolution layers")
    if prune_ratio > 0:
        prune.global_unstructured(
            [(conv, "weight") for conv in convs], pruning_method=prune.L1Unstructured, amount=prune_ratio
        )
        if permanent:
            for conv in convs:
                prune.remove(conv, "weight")
    return conv_sparsity(model)


@torch.no_grad()
def conv_sparsity(model: nn.Module) -> float:
    """Share of convolution weights that are exactly zero."""
    convs = conv_layers(model)
    zeros = sum(int((conv.weight == 0).sum()) for conv in convs)
    total = sum(conv.weight.numel() for conv in convs)
    return zeros / total
