"""Spike statistics: firing rates, SOPs and the energy formula on networks whose answer is known."""
import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron

from rekd.config import TrainConfig
from rekd.snn.energy import E_AC_PJ, E_MAC_PJ, SpikeMonitor, synaptic_ops
from rekd.snn.models import SpikingNet, build_model, synaptic_layers
from rekd.snn.prune import magnitude_prune


def monitored(net, x):
    with SpikeMonitor(net) as monitor, torch.no_grad():
        net(x)
    return monitor.summary()


def test_binary_inputs_accumulate_and_real_inputs_multiply_accumulate_over_every_live_synapse():
    conv_in = layer.Conv2d(1, 2, 3, padding=1, bias=False)
    conv_spk = layer.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv_in.weight.fill_(1.0)
        conv_spk.weight.fill_(0.5)
    net = SpikingNet(torch.nn.Sequential(conv_in, neuron.IFNode(), conv_spk, layer.Flatten(),
                                         layer.Linear(3 * 16, 2)))
    x = torch.rand(2, 5, 1, 4, 4) + 0.2  # (T, N, C, H, W), real-valued
    stats = monitored(net, x)
    with torch.no_grad():  # the spikes the second conv saw
        spikes = neuron.IFNode(step_mode="m")(conv_in(x))
    # Padding is not input: on a 4x4 map a 3x3 tap row reads 2, 3, 3, 2 input rows, so (2+3+3+2)^2 = 100
    # of the 144 taps per output channel touch the image, not the dense 16 outputs x 9 taps.
    macs_first = 2 * 5 * 2 * 1 * 100  # T*N * out_ch * in_ch * in-image taps
    macs_linear = 2 * 5 * 2 * 48  # linear on the non-binary conv output: a multiply per weight
    # Every weight of the spiking conv is live: one accumulate per (spike, synapse) it reaches, which a
    # convolution with an all-ones kernel counts (not dense MACs x spike rate, which counts the padding).
    sops = F.conv2d(spikes.flatten(0, 1), torch.ones(3, 2, 3, 3), padding=1).sum().item()
    rate = float((spikes != 0).float().mean())
    assert stats["sops"] == pytest.approx(sops / 5)
    assert stats["macs"] == pytest.approx((macs_first + macs_linear) / 5)
    assert stats["energy_uj"] == pytest.approx((E_MAC_PJ * stats["macs"] + E_AC_PJ * stats["sops"]) * 1e-6)
    assert stats["firing_rate"] == pytest.approx(rate)
    assert stats["firing_rate/body.1"] == pytest.approx(rate)


# A 3x3 map, a 3x3 kernel with padding 1, two output channels (18 weights, 9 of them zero):
#   out 0 live at  x . .      out 1 live at  . x .
#                  x x x                     . x .
#                  . . x                     x x .
# Kernel row i reads input row r from output row r - i + 1, which exists for r = 0: i in {0, 1};
# r = 1: i in {0, 1, 2}; r = 2: i in {1, 2}; the same for columns.
SPARSE_KERNELS = torch.tensor([[[1., 0, 0], [2, 3, 4], [0, 0, 5]],
                               [[0., 6, 0], [0, 7, 0], [8, 9, 0]]]).reshape(2, 1, 3, 3)
SPIKES_T0 = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 1, 0]])  # corner (0,0), centre (1,1), bottom (2,1)
SPIKES_T1 = torch.tensor([[0., 0, 0], [0, 1, 0], [0, 0, 0]])  # centre only


@pytest.mark.parametrize("dense,expected", [
    # Sparse: corner (0,0) reaches taps (0,0) (0,1) (1,0) (1,1): out 0 has (0,0) (1,0) (1,1) live, 3;
    #   out 1 has (0,1) (1,1), 2; so 5. Centre reaches all 9 taps: 5 + 4 = 9. Bottom (2,1) reaches rows
    #   1-2, all columns: out 0 (1,0) (1,1) (1,2) (2,2), 4; out 1 (1,1) (2,0) (2,1), 3; so 7.
    #   t0: 5 + 9 + 7 = 21; t1: 9. 21 + 9 = 30.
    (False, 30.0),
    # Dense: 2 outputs x reached taps: corner 2 x 4 = 8, centre 2 x 9 = 18, bottom 2 x 6 = 12.
    #   t0: 8 + 18 + 12 = 38; t1: 18. 38 + 18 = 56.
    (True, 56.0),
])
def test_a_conv_on_spikes_accumulates_once_per_spike_and_live_synapse_it_reaches(dense, expected):
    conv = layer.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 19.0).reshape(2, 1, 3, 3) if dense else SPARSE_KERNELS)
    net = SpikingNet(torch.nn.Sequential(conv))
    x = torch.stack([SPIKES_T0, SPIKES_T1]).reshape(2, 1, 1, 3, 3)  # (T, N, C, H, W), one sample
    stats = monitored(net, x)
    assert stats["sops"] == expected
    assert stats["macs"] == 0
    assert stats["energy_uj"] == pytest.approx(E_AC_PJ * expected * 1e-6)


@pytest.mark.parametrize("dense,expected", [
    # Sparse: live weights per input (column) 2, 2, 1, 1; t0 spikes on inputs 0, 1, 3: 2 + 2 + 1 = 5;
    #   t1 on input 2: 1. 5 + 1 = 6.
    (False, 6.0),
    # Dense: 3 outputs per spike, 3 + 1 spikes: 12.
    (True, 12.0),
])
def test_a_linear_layer_on_spikes_accumulates_once_per_spike_and_live_weight(dense, expected):
    linear = layer.Linear(4, 3, bias=False)
    weight = torch.tensor([[1., 0, 2, 0], [0, 3, 0, 4], [5, 6, 0, 0]])
    with torch.no_grad():
        linear.weight.copy_(weight + (weight == 0) * 7 if dense else weight)
    net = SpikingNet(torch.nn.Sequential(linear))
    x = torch.tensor([[1., 1, 0, 1], [0, 0, 1, 0]]).reshape(2, 1, 4)  # (T, N, features)
    stats = monitored(net, x)
    assert stats["sops"] == expected and stats["macs"] == 0


def test_real_inputs_multiply_accumulate_over_live_weights_and_in_image_taps():
    conv = layer.Conv2d(1, 2, 3, padding=1, bias=False)
    linear = layer.Linear(2 * 9, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(SPARSE_KERNELS)
        linear.weight.copy_(torch.arange(1.0, 37.0).reshape(2, 18) * (torch.arange(36) % 2).reshape(2, 18))
    net = SpikingNet(torch.nn.Sequential(conv, layer.Flatten(), linear))
    x = torch.rand(1, 2, 1, 3, 3) + 0.2  # (T, N, C, H, W): real values
    x[0, 0, 0, 0, 0] = 0.0  # an input element is multiplied whatever its value
    stats = monitored(net, x)
    # Conv, per sample: kernel row (or column) 0 reads input rows 0-1 (2 of them), row 1 all 3, row 2 rows
    #   1-2 (2); a live tap (i, j) multiplies rows(i) x cols(j) inputs. Out 0: (0,0) 2x2 + (1,0) 3x2 +
    #   (1,1) 3x3 + (1,2) 3x2 + (2,2) 2x2 = 4 + 6 + 9 + 6 + 4 = 29; out 1: (0,1) 2x3 + (1,1) 3x3 +
    #   (2,0) 2x2 + (2,1) 2x3 = 6 + 9 + 4 + 6 = 25. 29 + 25 = 54 (all 18 weights live: 2 x 7 x 7 = 98;
#   dense with the padding taps: 2 outputs x 9 positions x 9 taps = 162).
    # Linear, per sample: the conv output is real; one multiply per live weight, 18 of 36: 18.
    assert stats["macs"] == 54 + 18
    assert stats["sops"] == 0


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [
    (3, 1, 1, 1, 1), (3, 2, 1, 1, 2), (2, 1, "same", 2, 1), (1, 2, 0, 1, 2), (5, 1, 2, 2, 2),
])
def test_counts_equal_a_convolution_of_the_live_synapses(kernel, stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.5)
    live = (conv.weight != 0).float()

    def by_conv(x):
        return F.conv2d(x, live, None, stride, padding, dilation, groups).sum().item()

    spikes = (torch.rand(3, 2, 4, 9, 7) < 0.3).float()  # (T, N, C, H, W)
    sops, macs = synaptic_ops(conv, spikes, conv(spikes.flatten(0, 1)))
    assert sops.item() == by_conv(spikes.flatten(0, 1)) and macs.item() == 0
    sops, _ = synaptic_ops(conv, spikes.bfloat16(), conv(spikes.flatten(0, 1)))
    assert sops.item() == by_conv(spikes.flatten(0, 1))
    real = torch.randn(6, 4, 9, 7)
    sops, macs = synaptic_ops(conv, real, conv(real))
    assert macs.item() == by_conv(torch.ones_like(real)) and sops.item() == 0


def test_a_pruned_network_counts_the_same_with_or_without_the_pruning_mask_attached():
    cfg = TrainConfig(arch="tiny").resolved(default_timesteps=2)
    stats = []
    for permanent in (True, False):
        torch.manual_seed(0)
        net = build_model(cfg, 1, 10, 8)
        magnitude_prune(net, 0.5, permanent=permanent)
        stats.append(monitored(net, torch.rand(2, 3, 1, 8, 8) * 3))
    assert stats[0]["sops"] == stats[1]["sops"] and stats[0]["macs"] == stats[1]["macs"]


def test_monitor_removes_its_hooks():
    net = SpikingNet(torch.nn.Sequential(layer.Conv2d(1, 2, 3), neuron.IFNode()))
    with SpikeMonitor(net):
        pass
    assert all(not m._forward_hooks for m in net.modules())
    assert synaptic_layers(net)  # the conv was a hooked layer
