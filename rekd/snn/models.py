"""Spiking networks of IF neurons (spikingjelly), multi-step, input [T, N, C, H, W] -> logits [N, classes].

The registry ARCHS maps a name to a factory `(in_channels, num_classes, resolution, neuron) -> body`; the
body is a multi-step module whose output is [T, N, classes]. SpikingNet wraps it: the readout is the mean
over T of the last layer, and every neuron's state is reset after every forward, in training and
evaluation alike, so no batch leaks membrane potential into the next.

Static images are direct-encoded: the image is repeated T times (see rekd.datasets) and the first
conv + IF layer acts as the encoder. Event data brings its own time axis.
"""
from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

from rekd.config import TrainConfig
from rekd.registry import lookup

SURROGATES: dict[str, Callable[[float], nn.Module]] = {
    "atan": lambda alpha: surrogate.ATan(alpha=alpha),
    "sigmoid": lambda alpha: surrogate.Sigmoid(alpha=alpha),
}

NeuronFactory = Callable[[], nn.Module]


def neuron_factory(cfg: TrainConfig) -> NeuronFactory:
    """IF neurons with the run's threshold, reset, surrogate and detach_reset settings."""
    make_surrogate = lookup(SURROGATES, cfg.surrogate, "surrogate")
    return lambda: neuron.IFNode(
        v_threshold=cfg.v_threshold,
        v_reset=cfg.v_reset,
        surrogate_function=make_surrogate(cfg.surrogate_alpha),
        detach_reset=cfg.detach_reset,
        step_mode="m",
    )


def conv_bn(in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [
        layer.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        layer.BatchNorm2d(out_ch),
    ]


def classifier(channels: int, num_classes: int) -> list[nn.Module]:
    return [layer.AdaptiveAvgPool2d(1), layer.Flatten(), layer.Linear(channels, num_classes)]


# -- tiny: two conv + IF blocks, for fast CPU runs ------------------------------------------------------
def tiny(in_channels: int, num_classes: int, resolution: int, make_neuron: NeuronFactory) -> nn.Module:
    # Pool only while the map stays >= 4 px; a 2x2 map before the readout keeps where features are,
    # which a digit's identity depends on.
    pool1 = [layer.MaxPool2d(2)] if resolution >= 8 else []
    pool2 = [layer.MaxPool2d(2)] if resolution >= 16 else []
    return nn.Sequential(
        *conv_bn(in_channels, 32), make_neuron(), *pool1,
        *conv_bn(32, 64), make_neuron(), *pool2,
        layer.AdaptiveAvgPool2d(2), layer.Flatten(), layer.Linear(64 * 4, num_classes),
    )


# -- spiking ResNet18, CIFAR stem (3x3 stride-1 conv, no max-pool) -----------------------------------------
class BasicBlock(nn.Module):
    """conv-BN-IF-conv-BN, plus the (projected) input, then IF: the spiking ResNet's basic block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, make_neuron: NeuronFactory):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(in_ch, out_ch, stride), make_neuron(), *conv_bn(out_ch, out_ch))
        self.shortcut = (
            nn.Sequential(*conv_bn(in_ch, out_ch, stride, kernel=1))
            if stride != 1 or in_ch != out_ch else nn.Identity()
        )
        self.sn = make_neuron()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, N, C, H, W)
        return self.sn(self.body(x) + self.shortcut(x))


def resnet18(in_channels: int, num_classes: int, resolution: int, make_neuron: NeuronFactory) -> nn.Module:
    stages, in_ch = [], 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [BasicBlock(in_ch, out_ch, stride, make_neuron), BasicBlock(out_ch, out_ch, 1, make_neuron)]
        in_ch = out_ch
    return nn.Sequential(*conv_bn(in_channels, 64), make_neuron(), *stages, *classifier(512, num_classes))


# -- spiking WRN16-4 (pre-activation wide blocks: BN-IF-conv) --------------------------------------------
class WideBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, make_neuron: NeuronFactory):
        super().__init__()
        self.pre = nn.Sequential(layer.BatchNorm2d(in_ch), make_neuron())
        self.body = nn.Sequential(
            layer.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            layer.BatchNorm2d(out_ch), make_neuron(),
            layer.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        )
        # The projection reads the pre-activated spikes, as in the original WRN.
        self.shortcut = (
            layer.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, N, C, H, W)
        spikes = self.pre(x)
        residual = x if self.shortcut is None else self.shortcut(spikes)
        return self.body(spikes) + residual


def wrn16_4(in_channels: int, num_classes: int, resolution: int, make_neuron: NeuronFactory) -> nn.Module:
    depth, width = 16, 4
    blocks_per_group = (depth - 4) // 6  # 2
    widths = [16, 16 * width, 32 * width, 64 * width]
    groups, in_ch = [], widths[0]
    for out_ch, stride in zip(widths[1:], (1, 2, 2)):
        for i in range(blocks_per_group):
            groups.append(WideBlock(in_ch, out_ch, stride if i == 0 else 1, make_neuron))
            in_ch = out_ch
    return nn.Sequential(
        layer.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        *groups,
        layer.BatchNorm2d(in_ch), make_neuron(),
        *classifier(in_ch, num_classes),
    )


# -- spiking VGG16 with batch norm --------------------------------------------------------------------
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(in_channels: int, num_classes: int, resolution: int, make_neuron: NeuronFactory) -> nn.Module:
    layers: list[nn.Module] = []
    in_ch, size = in_channels, resolution
    for item in VGG16_LAYOUT:
        if item == "M":
            # Small inputs (digits are 8x8) run out of resolution before the fifth pool: skip pools at 1x1.
            if size >= 2:
                layers.append(layer.MaxPool2d(2))
                size //= 2
            continue
        layers += [*conv_bn(in_ch, item), make_neuron()]
        in_ch = item
    return nn.Sequential(*layers, *classifier(in_ch, num_classes))


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "tiny": tiny,
    "resnet18": resnet18,
    "wrn16_4": wrn16_4,
    "vgg16": vgg16,
}


class SpikingNet(nn.Module):
    """A multi-step spiking body with a rate readout: logits = mean over T of the last layer."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        functional.set_step_mode(self.body, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, N, C, H, W) -> (N, classes)
        return self.readout(self.body, x)

    def readout(self, body: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        try:
            return body(x).mean(0)
        finally:
            # The autograd graph keeps what backward needs; the neurons' own state must not outlive the batch.
            functional.reset_net(self.body)

    def compiled(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This network's forward pass with the body compiled by torch.compile.

        Only the body is compiled: spikingjelly's reset_net walks a global module cache that compilation
        would guard on (a recompile per network), and it is cheap in eager mode. The compiled body is held
        by the returned function, not registered on the module, so the weights keep their names (no
        `_orig_mod.` in checkpoints or the teacher cache) and evaluation with hooks stays eager.
        """
        body = torch.compile(self.body)
        return lambda x: self.readout(body, x)


class InferenceIF(nn.Module):
    """The IF neuron's forward pass alone, for a network that never trains again (a frozen teacher).

    spikingjelly's IF op carries what training needs (the surrogate function, autograd bookkeeping, a
    stacked copy per step); without gradients a plain loop over T gives the same spikes about a third
    faster on a CPU. Multi-step, stateless across calls: (T, N, ...) -> spikes of the input's dtype.
    """

    def __init__(self, v_threshold: float, v_reset: float | None):
        super().__init__()
        self.v_threshold, self.v_reset = v_threshold, v_reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, N, ...) -> (T, N, ...)
        # spikingjelly starts V at v_reset (0 for soft reset); fp32 even under autocast.
        v = torch.full(x.shape[1:], self.v_reset or 0.0, dtype=torch.float32, device=x.device)
        spikes = torch.empty_like(x)
        for t in range(x.shape[0]):
            v = v + x[t]  # H[t] = V[t-1] + X[t]
            fired = v >= self.v_threshold
            spikes[t] = fired
            v = v.masked_fill(fired, self.v_reset) if self.v_reset is not None else v - fired * self.v_threshold
        return spikes


def freeze_for_inference(model: nn.Module) -> nn.Module:
    """Swap every IF layer of a frozen network for InferenceIF (same spikes, no training machinery)."""
    for name, child in model.named_children():
        if isinstance(child, neuron.IFNode):
            setattr(model, name, InferenceIF(float(child.v_threshold),
                                             None if child.v_reset is None else float(child.v_reset)))
        else:
            freeze_for_inference(child)
    return model.eval().requires_grad_(False)


def build_model(cfg: TrainConfig, in_channels: int, num_classes: int, resolution: int) -> SpikingNet:
    factory = lookup(ARCHS, cfg.arch, "arch")
    return SpikingNet(factory(in_channels, num_classes, resolution, neuron_factory(cfg)))


def spiking_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every IF neuron layer by its module path, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, neuron.IFNode)}


def synaptic_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every convolution and linear layer (the synapses) by its module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]

