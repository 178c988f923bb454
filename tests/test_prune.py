"""Global magnitude pruning (Eq. 3): ranked across all convs at once, nothing else touched."""
import pytest
import torch

from rekd.config import TrainConfig
from rekd.snn.models import build_model, conv_layers
from rekd.snn.prune import conv_sparsity, magnitude_prune


def tiny():
    torch.manual_seed(0)
    return build_model(TrainConfig().resolved(4), 1, 10, 8)


def test_the_smallest_weights_across_all_convs_are_zeroed_globally():
    net = tiny()
    first, second = conv_layers(net)
    with torch.no_grad():  # the first conv's weights are all smaller than the second's
        first.weight.copy_(torch.linspace(0.001, 0.01, first.weight.numel()).reshape(first.weight.shape))
        second.weight.copy_(torch.linspace(0.02, 1.0, second.weight.numel()).reshape(second.weight.shape))
    total = first.weight.numel() + second.weight.numel()
    ratio = (first.weight.numel() + 100) / total
    magnitude_prune(net, ratio)
    assert int((first.weight == 0).sum()) == first.weight.numel()  # a per-layer ratio would spare most of it
    assert int((second.weight == 0).sum()) == round(ratio * total) - first.weight.numel()
    kept = second.weight[second.weight != 0].abs().min()
    assert kept >= 0.02 + 100 * (0.98 / (second.weight.numel() - 1)) - 1e-6


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7, 0.9])
def test_reported_sparsity_is_the_ratio_and_other_parameters_are_untouched(ratio):
    net = tiny()
    others = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or k.endswith("bias") or ".8." in k}
    sparsity = magnitude_prune(net, ratio)
    assert sparsity == pytest.approx(ratio, abs=1e-3)
    assert conv_sparsity(net) == sparsity
    for k, v in others.items():
        torch.testing.assert_close(net.state_dict()[k], v)
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][0]
    assert (linear.weight != 0).all()


def test_ratio_zero_leaves_the_model_as_it_is():
    net = tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert magnitude_prune(net, 0.0) == 0.0
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k])


def test_permanent_pruning_leaves_no_reparametrisation_behind():
    net = tiny()
    magnitude_prune(net, 0.3)
    assert all(not hasattr(m, "weight_orig") and not m._forward_pre_hooks for m in conv_layers(net))
    net2 = tiny()
    magnitude_prune(net2, 0.3, permanent=False)
    assert all(hasattr(m, "weight_mask") for m in conv_layers(net2))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_zero_to_one_is_refused(ratio):
    with pytest.raises(ValueError, match="prune_ratio"):
        magnitude_prune(tiny(), ratio)
