"""Spiking networks: shapes at every dataset's input, IF settings, state reset, the registry."""
import pytest
import torch
from spikingjelly.activation_based import neuron, surrogate

from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.snn.models import ARCHS, InferenceIF, build_model, freeze_for_inference, spiking_layers


def model(arch="tiny", channels=1, classes=10, resolution=8, **settings):
    cfg = TrainConfig(arch=arch, **settings).resolved(default_timesteps=4)
    return build_model(cfg, channels, classes, resolution)


@pytest.mark.parametrize("arch,channels,classes,resolution,timesteps", [
    ("resnet18", 3, 100, 32, 4),  # CIFAR-100
    ("wrn16_4", 3, 100, 32, 4),
    ("vgg16", 3, 100, 32, 4),
    ("resnet18", 2, 11, 128, 2),  # DVS-Gesture frames (fewer steps than T=16 to keep the test short)
    ("wrn16_4", 2, 11, 128, 2),
    ("vgg16", 2, 11, 128, 2),
    ("tiny", 1, 10, 8, 4),  # digits
    ("tiny", 2, 10, 22, 8),  # ndigits
])
def test_every_arch_runs_forward_and_backward_at_its_datasets_shape(arch, channels, classes, resolution, timesteps):
    net = model(arch, channels, classes, resolution)
    x = torch.rand(timesteps, 2, channels, resolution, resolution)
    logits = net(x)
    assert logits.shape == (2, classes)
    logits.sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_resnet18_and_wrn_have_cifar_stems():
    for arch in ("resnet18", "wrn16_4"):
        first_conv = next(m for m in model(arch, 3, 100, 32).modules() if isinstance(m, torch.nn.Conv2d))
        assert first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1)
        assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model(arch, 3, 100, 32).modules())


@pytest.mark.parametrize("training", [True, False])
def test_two_forwards_of_the_same_input_give_the_same_output(training):
    net = model(resolution=8).train(training)
    x = torch.rand(4, 3, 1, 8, 8) * 3
    first, second = net(x), net(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert all(isinstance(n.v, float) for n in spiking_layers(net).values())  # back to the reset value


def test_readout_is_the_mean_over_time_of_the_last_layer():
    net = model()
    x = torch.rand(4, 2, 1, 8, 8)
    per_step = net.body(x)
    net.body.apply(lambda m: m.reset() if hasattr(m, "reset") else None)
    torch.testing.assert_close(net(x), per_step.mean(0))


def test_neuron_settings_reach_every_if_layer():
    net = model(surrogate="sigmoid", surrogate_alpha=3.0, v_threshold=0.5, v_reset=None, detach_reset=True)
    layers = list(spiking_layers(net).values())
    assert layers and all(isinstance(n, neuron.IFNode) for n in layers)
    for n in layers:
        assert n.v_threshold == 0.5 and n.v_reset is None and n.detach_reset
        assert isinstance(n.surrogate_function, surrogate.Sigmoid) and n.surrogate_function.alpha == 3.0
        assert n.step_mode == "m"
    default = list(spiking_layers(model()).values())[0]
    assert default.v_threshold == 1.0 and default.v_reset == 0.0
    assert isinstance(default.surrogate_function, surrogate.ATan)


def test_unknown_arch_names_the_allowed_ones():
    with pytest.raises(UsageError, match="unknown arch 'resnet50'; allowed: resnet18, tiny, vgg16, wrn16_4"):
        model("resnet50")


def test_registry_holds_the_four_architectures():
    assert set(ARCHS) == {"tiny", "resnet18", "wrn16_4", "vgg16"}


@pytest.mark.parametrize("v_reset", [0.0, -0.5, None])  # hard reset to 0, to a negative value, soft reset
def test_inference_if_gives_spikingjellys_spikes(v_reset):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5, 5, dtype=torch.float64)
    reference = neuron.IFNode(v_threshold=0.7, v_reset=v_reset, step_mode="m")
    with torch.no_grad():
        expected = reference(x)
    assert expected.sum() > 0 and (expected == 0).any()  # the check is not vacuous
    assert torch.equal(InferenceIF(0.7, v_reset)(x), expected)


@pytest.mark.parametrize("arch,resolution", [("tiny", 8), ("resnet18", 8), ("wrn16_4", 8)])
def test_a_frozen_network_gives_the_logits_of_the_network_it_was(arch, resolution):
    torch.manual_seed(0)
    net = model(arch, 1, 10, resolution).double()
    x = torch.rand(4, 3, 1, resolution, resolution, dtype=torch.float64)
    net.train()
    net(x)  # move the batch-norm running statistics away from their initial values
    net.eval()
    with torch.no_grad():
        expected = net(x)
    frozen = freeze_for_inference(net)
    assert not spiking_layers(frozen) and not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(frozen(x), expected)
