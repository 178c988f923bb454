"""The re-KD losses against values worked out by hand on tiny tensors, and against their gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from rekd.snn.losses import default_kd_loss, kl_div, soften, sparse_kd_loss, virtual_teacher


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_sparse_kd_loss_matches_eq5_by_hand():
    # student [1, 0], teacher [0, 1], T = 2: q_s = softmax([.5, 0]), q_t = softmax([0, .5]);
    # KL(q_t || q_s) = (0.622459 - 0.377541) * 0.5 = 0.122459, CE = ln(1 + e^-1) = 0.313262.
    loss, parts = sparse_kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]),
                                 alpha=0.5, temperature=2.0)
    assert parts["kd"].item() == pytest.approx(0.122459, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(0.313262, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 4 * 0.122459 + 0.5 * 0.313262, abs=1e-5)


def test_sparse_kd_loss_averages_kl_over_the_batch():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    y = torch.tensor([0, 1])
    _, parts = sparse_kd_loss(s, t, y, alpha=1.0, temperature=3.0)
    per_sample = [kl(softmax([v / 3 for v in ti]), softmax([v / 3 for v in si])) for si, ti in zip(s.tolist(), t.tolist())]
    assert parts["kd"].item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)


def test_sparse_kd_loss_gradient_is_the_closed_form():
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    alpha, temp = 0.7, 3.0
    loss, _ = sparse_kd_loss(s, t, y, alpha=alpha, temperature=temp)
    loss.backward()
    # d/ds [alpha T^2 KL(p_t || softmax(s/T))] = alpha T (softmax(s/T) - p_t); CE: softmax(s) - onehot.
    expected = (alpha * temp * (F.softmax(s / temp, -1) - F.softmax(t / temp, -1))
                + (1 - alpha) * (F.softmax(s, -1) - F.one_hot(y, 5))) / 4
    torch.testing.assert_close(s.grad, expected.detach())


def test_sparse_kd_loss_passes_gradcheck_and_never_grads_the_teacher():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 3])
    assert torch.autograd.gradcheck(lambda s: sparse_kd_loss(s, t, y, alpha=0.3, temperature=2.0)[0], (s,))
    sparse_kd_loss(s, t, y, alpha=0.3, temperature=2.0)[0].backward()
    assert t.grad is None


def test_virtual_teacher_is_eq6():
    p = virtual_teacher(torch.tensor([2, 0]), 4, confidence=0.91)
    expected = torch.tensor([[0.03, 0.03, 0.91, 0.03], [0.91, 0.03, 0.03, 0.03]])
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))


@pytest.mark.parametrize("confidence", [0.25, 0.1, 1.0, 1.2])
def test_virtual_teacher_refuses_confidence_outside_one_over_c_to_one(confidence):
    with pytest.raises(ValueError, match="confidence"):
        virtual_teacher(torch.tensor([0]), 4, confidence=confidence)


def test_default_kd_loss_matches_eq7_by_hand():
    # C = 2, confidence 0.9: p = [0.9, 0.1]; Q_T^tau = softmax(p / T) with T = 0.5 -> softmax([1.8, 0.2]);
    # the student [1, 0] is not softened: Q_S = softmax([1, 0]); no T^2.
    student, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    q_t, q_s = softmax([1.8, 0.2]), softmax([1.0, 0.0])
    ce = -math.log(q_s[0])
    loss, parts = default_kd_loss(student, y, confidence=0.9, alpha=0.4, temperature=0.5)
    assert parts["kd"].item() == pytest.approx(kl(q_t, q_s), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(0.4 * kl(q_t, q_s) + 0.6 * ce, rel=1e-5)


def test_default_kd_loss_gradient_is_the_closed_form():
    torch.manual_seed(1)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([5, 0, 2])
    alpha, temp, conf = 0.6, 2.0, 0.93
    default_kd_loss(s, y, confidence=conf, alpha=alpha, temperature=temp)[0].backward()
    q_t = F.softmax(virtual_teacher(y, 6, confidence=conf).double() / temp, -1)
    expected = (alpha * (F.softmax(s, -1) - q_t) + (1 - alpha) * (F.softmax(s, -1) - F.one_hot(y, 6))) / 3
    torch.testing.assert_close(s.grad, expected.detach())


def test_alpha_zero_is_plain_cross_entropy_and_kl_of_equal_distributions_is_zero():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    ce = F.cross_entropy(s, y)
    torch.testing.assert_close(sparse_kd_loss(s, t, y, alpha=0.0, temperature=4.0)[0], ce)
    torch.testing.assert_close(default_kd_loss(s, y, confidence=0.9, alpha=0.0, temperature=4.0)[0], ce)
    p = soften(s, 2.0)
    assert kl_div(p, p.log()).abs().item() < 1e-6


# -- kd_reduction=elementwise: the KL term averaged over batch x classes, as the cited code's nn.KLDivLoss() ----
def test_elementwise_sparse_kd_loss_matches_eq5_by_hand_over_two_classes():
    # The example above: KL = 0.122459 summed over 2 classes of 1 sample -> 0.122459 / 2 per element.
    loss, parts = sparse_kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]),
                                 alpha=0.5, temperature=2.0, reduction="elementwise")
    assert parts["kd"].item() == pytest.approx(0.0612295, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 4 * 0.0612295 + 0.5 * 0.313262, abs=1e-5)


def test_elementwise_is_the_cited_codes_kldivloss_and_one_over_c_of_batchmean():
    # Tf-KD's loss_kd: nn.KLDivLoss()(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1)) * (alpha * T * T);
    # KLDivLoss's default reduction is "mean", over every element.
    torch.manual_seed(2)
    s, t, y = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    cited = torch.nn.KLDivLoss()(F.log_softmax(s / 3.0, dim=1), F.softmax(t / 3.0, dim=1))
    _, element = sparse_kd_loss(s, t, y, alpha=0.9, temperature=3.0, reduction="elementwise")
    _, batch = sparse_kd_loss(s, t, y, alpha=0.9, temperature=3.0)
    torch.testing.assert_close(element["kd"], cited)
    torch.testing.assert_close(element["kd"], batch["kd"] / 10)


def test_elementwise_default_kd_loss_matches_eq7_by_hand():
    # The Eq. 7 example above (C = 2): the KL term is halved, the cross-entropy is not.
    student, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    q_t, q_s = softmax([1.8, 0.2]), softmax([1.0, 0.0])
    ce = -math.log(q_s[0])
    loss, parts = default_kd_loss(student, y, confidence=0.9, alpha=0.4, temperature=0.5, reduction="elementwise")
    assert parts["kd"].item() == pytest.approx(kl(q_t, q_s) / 2, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(0.4 * kl(q_t, q_s) / 2 + 0.6 * ce, rel=1e-5)


def test_elementwise_gradients_are_the_closed_forms_over_c():
    torch.manual_seed(3)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    alpha, temp, conf = 0.7, 3.0, 0.93
    sparse_kd_loss(s, t, y, alpha=alpha, temperature=temp, reduction="elementwise")[0].backward()
    expected = (alpha * temp * (F.softmax(s / temp, -1) - F.softmax(t / temp, -1)) / 5
                + (1 - alpha) * (F.softmax(s, -1) - F.one_hot(y, 5))) / 4
    torch.testing.assert_close(s.grad, expected.detach())
    s.grad = None
    default_kd_loss(s, y, confidence=conf, alpha=alpha, temperature=temp, reduction="elementwise")[0].backward()
    q_t = F.softmax(virtual_teacher(y, 5, confidence=conf).double() / temp, -1)
    expected = (alpha * (F.softmax(s, -1) - q_t) / 5 + (1 - alpha) * (F.softmax(s, -1) - F.one_hot(y, 5))) / 4
    torch.testing.assert_close(s.grad, expected.detach())


def test_an_unknown_reduction_is_a_bug_that_raises():
    p = soften(torch.randn(2, 3), 2.0)
    with pytest.raises(ValueError, match="reduction='sum'"):
        kl_div(p, p.log(), "sum")
