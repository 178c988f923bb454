"""Spike statistics of an SNN during evaluation: firing rates, synaptic operations and an energy estimate.

Energy per sample = 4.6 pJ x MACs + 0.9 pJ x SOPs (45 nm CMOS figures for a 32-bit float multiply-add
and add, Horowitz 2014, as in most SNN papers). A synaptic layer whose input is binary spikes performs
one accumulate per input spike and outgoing synapse: SOPs = dense MACs x the input's spike rate. A layer
fed real values (the direct-encoding first conv, a linear layer after average pooling) multiplies:
its dense MACs count at the MAC price. Both are summed over all T timesteps.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from rekd.snn.models import spiking_layers, synaptic_layers

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


def dense_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates a dense evaluation of this call would do (all T, all samples)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features  # nn.Linear


def accumulator(x: torch.Tensor) -> torch.dtype:
    """float64 sums where the device has them (an epoch's SOPs reach 1e13, past float32's exact range)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


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
        x = inputs[0].detach()
        macs = dense_macs(module, output)
        dtype = accumulator(x)
        spikes = ((x == 0) | (x == 1)).all().to(dtype)  # 1: binary input, accumulates; 0: multiply-accumulates
        rate = (x != 0).sum(dtype=dtype) / x.numel()
        self.sops = self.sops + spikes * rate * macs
        self.macs = self.macs + (1 - spikes) * macs

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
