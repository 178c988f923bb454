"""Spike statistics of an SNN during evaluation: firing rates, synaptic operations and an energy estimate.

Energy per sample = 4.6 pJ x MACs + 0.9 pJ x SOPs (45 nm CMOS figures for a 32-bit float multiply-add
and add, Horowitz 2014, as in most SNN papers). Only live synapses count: a synapse is live when its
weight is nonzero, so a pruned or sparse network, which keeps its removed connections as exact zeros,
is credited only with the connections it has. A synaptic layer (conv or linear) whose input is binary
spikes performs one accumulate (SOP) per pair of an input spike and a live synapse leaving it: for a
conv, F.conv2d(x, weight != 0, ...).sum(), so padding, which holds no spikes, adds nothing. A layer fed
real values (the direct-encoding first conv, a linear layer after average pooling) performs one
multiply-accumulate (MAC) per pair of a real input element and a live synapse leaving it: for a conv,
F.conv2d(ones_like(x), weight != 0, ...).sum(), padding taps not counted; for a linear layer, samples x
live weights. Both are summed over all T timesteps.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from rekd.snn.models import spiking_layers, synaptic_layers

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


def accumulator(x: torch.Tensor) -> torch.dtype:
    """float64 sums where the device has them (an epoch's SOPs reach 1e13, past float32's exact range)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def synaptic_ops(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SOPs, MACs) of one call of a conv or linear layer on input x, as 0-d tensors on x's device.

    The count is the sum of F.conv2d(x, live) for binary x and of F.conv2d(ones_like(x), live) for real
    x (x @ live.T and ones @ live.T for a linear layer), found without a second convolution: it is linear
    in the input, so the input is summed over samples and timesteps first (each element's spike count, or
    for real input the number of samples), then over the positions each kernel tap reads, and weighted by
    the live synapses per (input channel, tap).
    """
    dtype = accumulator(x)
    binary = ((x == 0) | (x == 1)).all()  # no read-back: both counts are kept, one of them times zero
    live = module.weight.detach() != 0
    features = x.shape[-3:] if isinstance(module, nn.Conv2d) else x.shape[-1:]
    flat = x.reshape(-1, *features)  # (samples, C, H, W) or (samples, in_features): T and N alike
    load = torch.where(binary, flat.sum(0, dtype=dtype), float(flat.shape[0]))
    if isinstance(module, nn.Conv2d):
        ops = _conv_ops(module, load, live, output.shape[-2:], dtype)
    else:  # nn.Linear: each input feature feeds the live weights of its column
        ops = load @ live.sum(0, dtype=dtype)
    return ops * binary, ops * ~binary


def _conv_ops(module: nn.Conv2d, load: torch.Tensor, live: torch.Tensor, out_size: torch.Size,
              dtype: torch.dtype) -> torch.Tensor:
    """sum over (input channel c, tap (i, j)) of the load that tap reads over all output positions, times
    the live synapses from channel c at that tap. load: (C, H, W), summed over samples; padding is applied
    here as the layer applies it, so zero padding contributes nothing."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    (oh, ow), groups = out_size, module.groups
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    load = F.pad(load[None], _padding(module), mode=mode)[0]
    # Tap i reads rows i*dh, i*dh + sh, ..., one per output row; likewise for columns.
    rows = torch.stack([load[:, i * dh: i * dh + sh * (oh - 1) + 1: sh].sum(1) for i in range(kh)], 1)
    reached = torch.stack([rows[..., j * dw: j * dw + sw * (ow - 1) + 1: sw].sum(-1) for j in range(kw)], -1)
    # live: (out, in/groups, kh, kw); an input channel's synapses go to the outputs of its own group.
    out_ch, in_per_group = live.shape[:2]
    fan_out = live.reshape(groups, out_ch // groups, in_per_group, kh, kw).sum(1, dtype=dtype)
    return (reached * fan_out.reshape(-1, kh, kw)).sum()


def _padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """The layer's padding as F.pad takes it: (left, right, top, bottom)."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":  # torch puts the odd pixel of an even total on the right / bottom
        pads: list[int] = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


class SpikeMonitor:
    """Counts spikes and synaptic operations while active: `with SpikeMonitor(model) as m: ...; m.summary()`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.spikes: dict[str, float] = defaultdict(float)
        self.neurons: dict[str, int] = defaultdict(int)
        self.macs = 0.0
        self.sops = 0.0
        self.samples = 0
        self.handles: list = []

    def __enter__(self) -> "SpikeMonitor":
        for name, module in spiking_layers(self.model).items():
            self.handles.append(module.register_forward_hook(self._count_spikes(name)))
        for module in synaptic_layers(self.model).values():
            self.handles.append(module.register_forward_hook(self._count_ops))
        self.handles.append(self.model.register_forward_hook(self._count_samples))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # The counts stay on the device until summary(): reading a count back per batch and layer would make
    # the host wait for the GPU dozens of times per evaluation batch.
    def _count_spikes(self, name: str):
        def hook(module, inputs, output):
            self.spikes[name] = self.spikes[name] + output.detach().sum(dtype=accumulator(output))
            self.neurons[name] += output.numel()
        return hook

    def _count_ops(self, module, inputs, output):
        sops, macs = synaptic_ops(module, inputs[0].detach(), output)
        self.sops = self.sops + sops
        self.macs = self.macs + macs

    def _count_samples(self, module, inputs, output):
        self.samples += output.shape[0]  # output: (N, classes)

    def summary(self) -> dict[str, float]:
        """Per-sample SOPs, MACs and energy (uJ), the mean firing rate, and each IF layer's rate."""
        n = max(self.samples, 1)
        spikes = {name: float(count) for name, count in self.spikes.items()}  # the one read-back
        sops, macs = float(self.sops), float(self.macs)
        rates = {name: spikes[name] / max(self.neurons[name], 1) for name in spikes}
        total_neurons = sum(self.neurons.values())
        stats = {
            "sops": sops / n,
            "macs": macs / n,
            "energy_uj": (E_MAC_PJ * macs + E_AC_PJ * sops) / n * 1e-6,
            "firing_rate": sum(spikes.values()) / max(total_neurons, 1),
        }
        stats.update({f"firing_rate/{name}": rate for name, rate in rates.items()})
        return stats
