"""The re-KD objectives as pure functions of logits and targets (paper Eq. 4-7).

Each loss returns (loss, parts): `loss` is the scalar to minimise, `parts` holds the detached
cross-entropy and distillation terms for reporting. KL divergences are averaged over the batch
(sum over classes, mean over samples: "batchmean", Eq. 5 and 7 as written) or, with
reduction="elementwise", over every element (batch x classes), as the code the paper cites for its loss
does (PyTorch's KLDivLoss with its default reduction); that term is 1/C of the batchmean one for C classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rekd.config import KD_REDUCTIONS

Parts = dict[str, torch.Tensor]


def soften(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 4: q_i = exp(Z_i / T) / sum_j exp(Z_j / T), over the last dimension."""
    return F.softmax(z / temperature, dim=-1)


def kl_div(p: torch.Tensor, log_q: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c), averaged over the batch (batchmean) or over every
    element, samples x classes (elementwise); 0 log 0 counts as 0."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {' | '.join(KD_REDUCTIONS)}")
    kl = torch.special.xlogy(p, p).sum(-1).mean() - (p * log_q).sum(-1).mean()
    return kl / p.shape[-1] if reduction == "elementwise" else kl


def cross_entropy_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Parts]:
    """The baseline ("Student SNN") objective: CE(softmax(student), y_true)."""
    ce = F.cross_entropy(student_logits, targets)
    return ce, {"ce": ce.detach(), "kd": torch.zeros_like(ce).detach()}


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, Parts]:
    """Eq. 5: L = alpha * T^2 * KL(Q_T^tau || Q_S^tau) + (1 - alpha) * CE(Q_S, y_true).

    Q^tau = softmax(Z / T) (Eq. 4) of the pruned teacher's and the student's logits; the T^2 keeps the
    gradient of the soft term on the scale of the hard one as T grows (Hinton et al.). KL is averaged as
    `reduction` says (the module's docstring).
    """
    teacher_soft = soften(teacher_logits.detach().to(student_logits.dtype), temperature)
    student_log_soft = F.log_softmax(student_logits / temperature, dim=-1)
    kd = kl_div(teacher_soft, student_log_soft, reduction)
    ce = F.cross_entropy(student_logits, targets)
    loss = alpha * temperature**2 * kd + (1 - alpha) * ce
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


def virtual_teacher(targets: torch.Tensor, num_classes: int, *, confidence: float) -> torch.Tensor:
    """Eq. 6: p(c) = confidence if c == t else (1 - confidence) / (C - 1); returns [N, C] probabilities.

    Legal only for 1/C < confidence < 1: anything else would not put the most mass on the true class.
    """
    if not 1.0 / num_classes < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must satisfy 1/{num_classes} < confidence < 1")
    off = (1.0 - confidence) / (num_classes - 1)
    p = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    return p.scatter_(1, targets.unsqueeze(1), confidence)


def default_kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    confidence: float,
    alpha: float,
    temperature: float,
    reduction: str = "batchmean",
) -> tuple[torch.Tensor, Parts]:
    """Eq. 7 as written: L = alpha * KL(Q_T^tau || Q_S) + (1 - alpha) * CE(Q_S, y_true).

    Q_T^tau = softmax(p / T) softens the virtual teacher's distribution p of Eq. 6 the way Eq. 4 softens
    logits (Z = p); the student's Q_S = softmax(student) is not softened and there is no T^2 factor. KL is
    averaged as `reduction` says (the module's docstring).
    """
    p = virtual_teacher(targets, student_logits.shape[-1], confidence=confidence).to(student_logits.dtype)
    teacher_soft = soften(p, temperature)
    student_log = F.log_softmax(student_logits, dim=-1)
    kd = kl_div(teacher_soft, student_log, reduction)
    ce = F.cross_entropy(student_logits, targets)
    loss = alpha * kd + (1 - alpha) * ce
    return loss, {"ce": ce.detach(), "kd": kd.detach()}
