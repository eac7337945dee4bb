"""Losses as pure tensor functions, plus the MEAL V2 output discriminator.

All KD losses take the student's logits and the label source's probabilities, so the same code
serves online teachers, stored labels and projectors. `KD_LOSSES` maps a recipe's `loss.kd` to one
`(student_logits, target_probs, temperature) -> loss`; a new KD loss is one registered function.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.registry import Registry

KD_LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = Registry("KD loss")


def soft_ce(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """MEAL V2 / FKD similarity loss: `-Σ p · log_softmax(z)`, batch mean."""
    return -(target_probs * F.log_softmax(student_logits.float(), 1)).sum(1).mean()


def kd_kl(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton KD: `T² · KL(p_T ‖ softmax(z / T))`, batch mean. `target_probs` are already at T.
    Equals `soft_ce` minus the (constant) teacher entropy at T = 1. T² keeps the gradient's size
    as T changes, so one SGD lr serves every T (SRe2L's scripts leave it out, under AdamW, which
    a constant loss scale does not move)."""
    log_q = F.log_softmax(student_logits.float() / temperature, 1)
    kl = (target_probs * (torch.log(target_probs.clamp_min(1e-12)) - log_q)).sum(1).mean()
    return kl * temperature**2


@KD_LOSSES.register("soft_ce")
def soft_ce_kd(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`loss.kd: soft_ce`: `soft_ce` on the label source's probabilities. `temperature` is 1: a
    recipe with another is refused at load (`distill.config.check_kd_temperature`)."""
    return soft_ce(student_logits, target_probs)


KD_LOSSES.register("kl")(kd_kl)


def hard_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits.float(), targets)


class OutputDiscriminator(nn.Module):
    """MEAL V2's discriminator on logits: 1×1 convs C → C/8 → C/64 → 2, ReLU after each (as the
    authors' code has it, including after the last — `final_relu=False` drops that one, since a
    dead final ReLU freezes the loss at ln 2). For small C the hidden widths would vanish (C = 10
    gives 1 and 0), so each is floored at `min_width` — our choice; a no-op at C ≥ 512."""

    def __init__(self, num_classes: int, min_width: int = 8, final_relu: bool = True):
        super().__init__()
        h1 = max(num_classes // 8, min_width)
        h2 = max(num_classes // 64, min_width)
        self.layers = nn.Sequential(
            nn.Conv2d(num_classes, h1, 1), nn.ReLU(),
            nn.Conv2d(h1, h2, 1), nn.ReLU(),
            nn.Conv2d(h2, 2, 1), nn.ReLU() if final_relu else nn.Identity(),
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.layers(logits.float()[:, :, None, None]).flatten(1)


def _domain_targets(n: int, teacher: bool, device: torch.device) -> torch.Tensor:
    t = torch.zeros(n, 2, device=device)
    t[:, 1 if teacher else 0] = 1.0
    return t


def discriminator_loss(disc: nn.Module, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits on the stacked batch: student rows → [1, 0], teacher rows → [0, 1]."""
    n, dev = len(student_logits), student_logits.device
    out = disc(torch.cat([student_logits, teacher_logits]))
    target = torch.cat([_domain_targets(n, False, dev), _domain_targets(len(teacher_logits), True, dev)])
    return F.binary_cross_entropy_with_logits(out, target)


def generator_loss(disc: nn.Module, student_logits: torch.Tensor) -> torch.Tensor:
    """Adversarial mode only: the student tries to be scored as a teacher."""
    out = disc(student_logits)
    return F.binary_cross_entropy_with_logits(out, _domain_targets(len(student_logits), True, student_logits.device))
