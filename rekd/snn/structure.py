"""Sparse students: which of a student's conv connections exist, learned while it trains.

`structure` (rekd.config) picks the method:
- dense: every connection, as in the paper's students.
- gmp: gradual magnitude pruning (Zhu & Gupta 2017). From `sparsity_start_epoch` to `sparsity_end_epoch`
  the sparsity follows s(t) = s_f + (s_i - s_f) (1 - p)^3, p the share of that window gone (s_i = 0, or the
  inherited mask's sparsity); every `prune_every` optimizer steps the smallest-|w| live weights are removed
  until s(t) is met. Masks only shrink. After the window the connections are fixed and the weights fine-tune.
- rewire: `target_sparsity` from the first step (a random mask spread over the layers by RigL's
  Erdős–Rényi-kernel rule, so that small layers such as the first conv stay dense, or the inherited one), the count of
  live weights held exactly (SET, Mocanu et al. 2018; RigL, Evci et al. 2020; ESL-SNNs, Shen et al. 2023).
  Every `prune_every` steps inside the window, a share f(t) of the live weights with the smallest |w| is
  dropped and as many dead connections are regrown: where |dL/dw| is largest (`regrow=gradient`, RigL: the
  gradient of a dead weight is computed anyway, its weight being an exact zero) or at random (`regrow=random`,
  SET). f(t) = rewire_fraction x (1 + cos(pi p)) / 2 decays to 0 at the window's end (RigL's schedule).
  Regrown weights start at zero (RigL), and the connections dropped in an update are not candidates in it.

Which weights: every convolution, the first included, ranked globally across layers, as the teacher is
pruned (Eq. 3): `density` is then on the same footing as the teacher's prune_ratio, and the global ranking
lets a layer whose weights matter keep more of them. The classifier (a Linear layer) stays dense: Eq. 3
prunes conv weights only, and it holds a small share of any architecture's weights (tiny: 3 %, resnet18:
0.5 %) while every class reads all of it.

Pruned weights stay exactly zero: before each optimizer step their gradients are zeroed (so momentum and
Adam's moments never move them, and weight decay of a zero is zero); their optimizer state is zeroed when
the mask changes; after each step the weights are multiplied by the mask again, whatever the optimizer,
precision or compilation did. The masks live outside the network (no forward hooks, state-dict keys as a
dense network's), so a sparse student is saved, loaded, compiled and used as a teacher like a dense one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from rekd.config import TrainConfig


def named_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The convolutions whose connections a structure learns, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def connection_counts(model: nn.Module, masks: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """`density` (live / all conv weights) and `connections` (live synapses: conv and linear weights).

    Live means in the mask where there is one (a regrown weight is live from the step it is regrown, still at
    zero), otherwise nonzero: a pruned teacher's removed weights are exact zeros, a trained dense weight is not.
    """
    live_conv = total_conv = live_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            live = masks[name] if masks is not None and name in masks else m.weight != 0
            live_conv += int(live.sum())
            total_conv += m.weight.numel()
        elif isinstance(m, nn.Linear):
            live_linear += int((m.weight != 0).sum())
    return {"density": live_conv / max(total_conv, 1), "connections": float(live_conv + live_linear)}


def cubic_sparsity(p: float, initial: float, target: float) -> float:
    """Zhu & Gupta's schedule: `initial` at p = 0, `target` at p = 1, fastest early while weights are redundant."""
    p = min(max(p, 0.0), 1.0)
    return target + (initial - target) * (1.0 - p) ** 3


def rewire_share(p: float, start_share: float) -> float:
    """RigL's cosine decay of the share of live weights rewired per update: start_share at p = 0, 0 at p = 1."""
    p = min(max(p, 0.0), 1.0)
    return start_share * (1.0 + math.cos(math.pi * p)) / 2.0


def keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A bool mask over a flat tensor: its `count` largest entries (ties broken by position, deterministically)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        keep[torch.topk(scores, count, sorted=False).indices] = True
    return keep


class Structure:
    """The masks of a sparse student and the schedule that changes them, step by step.

    Used by rekd.train.optim.Optimization around every optimizer step: `before_step` (gradients known: update
    the masks when the schedule says, zero the pruned gradients), `after_step` (re-apply the masks).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, steps_per_epoch: int, seed: int,
                 inherited: Optional[dict[str, torch.Tensor]] = None):
        if cfg.structure not in ("gmp", "rewire"):
            raise ValueError(f"Structure is for gmp and rewire students, not structure={cfg.structure!r}")
        self.cfg = cfg
        self.convs = named_convs(model)
        self.total = sum(m.weight.numel() for m in self.convs.values())
        self.start = cfg.sparsity_start_epoch * steps_per_epoch
        self.end = max(cfg.sparsity_end * steps_per_epoch, self.start + 1)
        self.step = 0  # optimizer steps taken
        self.generator = torch.Generator().manual_seed(seed)  # the random mask and random regrowth, on the CPU
        if inherited is not None:
            self.masks = {name: inherited[name].to(m.weight.device).clone() for name, m in self.convs.items()}
        elif cfg.structure == "rewire":
            self.masks = self.random_masks(round((1.0 - cfg.target_sparsity) * self.total))
        else:
            self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in self.convs.items()}
        self.initial_sparsity = 1.0 - self.live() / self.total
        self.apply()

    def random_masks(self, live: int) -> dict[str, torch.Tensor]:
        """`live` connections drawn at random, spread over the layers as RigL's Erdős–Rényi-kernel rule says:
        a layer's density proportional to (in + out + kh + kw) / (in x out x kh x kw), capped at dense. A
        uniform spread starves the small layers (the first conv keeps a tenth of its few inputs at 90 %)."""
        shapes = {name: conv.weight.shape for name, conv in self.convs.items()}
        score = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
        counts, dense = {}, set()
        while True:  # layers the rule would make denser than dense are dense; the rest share what is left
            left = live - sum(math.prod(shapes[n]) for n in dense)
            scale = left / sum(score[n] * math.prod(shapes[n]) for n in shapes if n not in dense)
            over = {n for n in shapes if n not in dense and scale * score[n] >= 1.0}
            if not over:
                break
            dense |= over
        for name, shape in shapes.items():
            counts[name] = math.prod(shape) if name in dense else round(scale * score[name] * math.prod(shape))
        counts[max(set(shapes) - dense or set(shapes), key=lambda n: counts[n])] += live - sum(counts.values())
        return {name: keep_top(torch.rand(math.prod(shape), generator=self.generator), counts[name])
                .reshape(shape).to(self.convs[name].weight.device) for name, shape in shapes.items()}

    # -- the schedule ----------------------------------------------------------------------------------
    def progress(self, step: int) -> float:
        """The share of the window done once optimizer step `step` (0-based) is taken."""
        return (step + 1 - self.start) / (self.end - self.start)

    def updates_at(self, step: int) -> bool:
        """A mask update before optimizer step `step` (0-based): every prune_every steps inside the window,
        and before its last step, so that gmp lands on its target exactly when the window closes."""
        return self.start <= step < self.end and (
            (step - self.start) % self.cfg.prune_every == 0 or step == self.end - 1)

    def sparsity_at(self, step: int) -> float:
        if self.cfg.structure == "rewire":
            return self.initial_sparsity
        return cubic_sparsity(self.progress(step), self.initial_sparsity, self.cfg.target_sparsity)

    # -- around each optimizer step --------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.updates_at(self.step):
            old = self.masks
            self.masks = self.pruned() if self.cfg.structure == "gmp" else self.rewired()
            for name, conv in self.convs.items():
                # Moments of a removed weight must not survive it, nor those of a dead one carry into its regrowth.
                for value in optimizer.state.get(conv.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == conv.weight.shape:
                        value.mul_(self.masks[name] & old[name])
                conv.weight.mul_(self.masks[name])  # dropped weights to zero, regrown ones start there
        for name, conv in self.convs.items():
            if conv.weight.grad is not None:
                conv.weight.grad.mul_(self.masks[name])

    @torch.no_grad()
    def after_step(self) -> None:
        self.apply()
        self.step += 1

    @torch.no_grad()
    def apply(self) -> None:
        for name, conv in self.convs.items():
            conv.weight.mul_(self.masks[name])

    # -- the two updates -------------------------------------------------------------------------------
    def flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in self.convs])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        masks, offset = {}, 0
        for name, conv in self.convs.items():
            n = conv.weight.numel()
            masks[name] = flat[offset:offset + n].reshape(conv.weight.shape).to(conv.weight.device)
            offset += n
        return masks

    def magnitudes(self) -> torch.Tensor:
        return self.flat({name: conv.weight.detach().float().abs() for name, conv in self.convs.items()})

    def pruned(self) -> dict[str, torch.Tensor]:
        """gmp: keep the largest-|w| live weights, as many as the scheduled sparsity allows."""
        live = self.flat(self.masks)
        keep = min(round((1.0 - self.sparsity_at(self.step)) * self.total), int(live.sum()))
        scores = self.magnitudes().masked_fill(~live, -1.0)  # the dead stay dead
        return self.unflatten(keep_top(scores, keep))

    def rewired(self) -> dict[str, torch.Tensor]:
        """rewire: drop the smallest-|w| share of the live weights, regrow as many dead connections."""
        live = self.flat(self.masks)
        n_live = int(live.sum())
        n = min(round(rewire_share(self.progress(self.step), self.cfg.rewire_fraction) * n_live), self.total - n_live)
        if n <= 0:
            return self.masks
        survivors = keep_top(self.magnitudes().masked_fill(~live, -1.0), n_live - n)
        if self.cfg.regrow == "gradient":
            grads = [conv.weight.grad if conv.weight.grad is not None else torch.zeros_like(conv.weight)
                     for conv in self.convs.values()]
            scores = self.flat(dict(zip(self.convs, [g.detach().float().abs() for g in grads])))
        else:
            scores = torch.rand(self.total, generator=self.generator).to(live.device)
        grown = keep_top(scores.masked_fill(live, -1.0), n)  # only connections dead before this update
        return self.unflatten(survivors | grown)

    # -- accounting and checkpoints --------------------------------------------------------------------
    def live(self) -> int:
        return int(sum(int(mask.sum()) for mask in self.masks.values()))

    def state_dict(self) -> dict:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}, "step": self.step,
                "initial_sparsity": self.initial_sparsity, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.masks = {name: state["masks"][name].to(conv.weight.device) for name, conv in self.convs.items()}
        self.step = int(state["step"])
        self.initial_sparsity = float(state["initial_sparsity"])
        self.generator.set_state(state["rng"])
        self.apply()
