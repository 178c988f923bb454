"""Spike statistics: firing rates, SOPs and the energy formula on networks whose answer is known."""
import pytest
import torch
from spikingjelly.activation_based import layer, neuron

from rekd.snn.energy import E_AC_PJ, E_MAC_PJ, SpikeMonitor
from rekd.snn.models import SpikingNet


def test_sops_are_dense_macs_times_input_spike_rate_and_real_inputs_count_as_macs():
    conv_in = layer.Conv2d(1, 2, 3, padding=1, bias=False)
    conv_spk = layer.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv_in.weight.fill_(1.0)
        conv_spk.weight.fill_(0.5)
    net = SpikingNet(torch.nn.Sequential(conv_in, neuron.IFNode(), conv_spk, layer.Flatten(),
                                         layer.Linear(3 * 16, 2)))
    x = torch.rand(2, 5, 1, 4, 4) + 0.2  # (T, N, C, H, W), real-valued
    with SpikeMonitor(net) as monitor, torch.no_grad():
        net(x)
    with torch.no_grad():  # the spikes the second conv saw
        spikes = neuron.IFNode(step_mode="m")(conv_in(x))
    stats = monitor.summary()
    macs_first = 2 * 5 * 2 * 16 * 9  # T*N*out_ch*H*W * in_ch*k*k
    macs_second = 2 * 5 * 3 * 16 * 2 * 9
    macs_linear = 2 * 5 * 2 * 48  # linear on non-binary conv output: a multiply
    rate = float((spikes != 0).float().mean())
    assert stats["sops"] == pytest.approx(macs_second * rate / 5)
    assert stats["macs"] == pytest.approx((macs_first + macs_linear) / 5)
    assert stats["energy_uj"] == pytest.approx((E_MAC_PJ * stats["macs"] + E_AC_PJ * stats["sops"]) * 1e-6)
    assert stats["firing_rate"] == pytest.approx(rate)
    assert stats["firing_rate/body.1"] == pytest.approx(rate)


def test_monitor_removes_its_hooks():
    net = SpikingNet(torch.nn.Sequential(layer.Conv2d(1, 2, 3), neuron.IFNode()))
    with SpikeMonitor(net):
        pass
    assert all(not m._forward_hooks for m in net.modules())
