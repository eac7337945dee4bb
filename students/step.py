"""One training step as a module: student (+ MEAL V2 discriminator) → named loss terms.

The trainer hands the whole `DistillStep` to a backend, so the optimiser sees the discriminator's
parameter group beside the student's, and a DeepSpeed engine can wrap it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from distill.config import LossConfig
from distill.models import ImageClassifier
from students.losses import KD_LOSSES, OutputDiscriminator, discriminator_loss, generator_loss, hard_ce
from teachers.source import SoftLabels


class DistillStep(nn.Module):
    """Without soft labels: cross-entropy on hard labels (supervised training = distillation with
    no teacher). With them: `kd` (+ `hard_ce` weight) (+ the discriminator):
    - `joint` (MEAL V2's code): `loss += BCE(D([z_s; z_t]))`, one optimiser minimises it over the
      student and D together — not a min-max game;
    - `adversarial`: D minimises that BCE on detached logits while the student minimises
      `BCE(D(z_s) → teacher)` through a frozen copy of D: a simultaneous GAN update, one backward.
    In both, D's parameter group starts at the student's lr (MEAL V2's train.py sets every group's
    lr each epoch) unless `loss.discriminator_lr` is a number; the lr schedule scales both groups.
    """

    def __init__(self, student: ImageClassifier, loss: LossConfig):
        super().__init__()
        self.student = student
        self.cfg = loss
        self.kd_loss = KD_LOSSES.get(loss.kd)
        self.discriminator = (OutputDiscriminator(student.num_classes, final_relu=loss.discriminator_final_relu)
                              if loss.discriminator != "none" else None)

    def param_groups(self, lr: float) -> list[dict]:
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "lr": lr, "name": "student"}]
        if self.discriminator is not None:
            d_lr = lr if self.cfg.discriminator_lr == "follow_student" else self.cfg.discriminator_lr
            groups.append({"params": list(self.discriminator.parameters()), "lr": d_lr, "name": "discriminator"})
        return groups

    def forward(self, images: torch.Tensor, targets: torch.Tensor, soft: SoftLabels | None = None) -> dict[str, torch.Tensor]:
        logits = self.student(images)
        terms: dict[str, torch.Tensor] = {}
        if soft is None:
            terms["ce"] = hard_ce(logits, targets)
            terms["loss"] = terms["ce"]
            return terms
        probs, kept = soft.probs, logits
        if soft.mask is not None:  # label sources may discard rows (e.g. FerKD)
            probs, kept = probs[soft.mask], logits[soft.mask]
        # a batch whose every row was discarded teaches nothing: a zero (not the NaN of an empty mean)
        kd = self.kd_loss(kept, probs, self.cfg.temperature) if len(kept) else logits.sum() * 0.0
        terms["kd"] = kd
        loss = kd
        if self.cfg.hard_ce > 0:
            terms["ce"] = hard_ce(logits, targets)
            loss = loss + self.cfg.hard_ce * terms["ce"]
        if self.discriminator is not None:
            if soft.logits is None:
                raise ValueError("the discriminator needs teacher logits; this label source gives probabilities only")
            w = self.cfg.discriminator_weight
            if self.cfg.discriminator == "joint":
                terms["disc"] = discriminator_loss(self.discriminator, logits, soft.logits)
                loss = loss + w * terms["disc"]
            else:
                terms["disc"] = discriminator_loss(self.discriminator, logits.detach(), soft.logits)
                frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
                terms["gen"] = generator_loss(lambda z: functional_call(self.discriminator, frozen, (z,)), logits)
                loss = loss + w * (terms["disc"] + terms["gen"])
        terms["loss"] = loss
        return terms
