"""The training objectives (generator = the pruned model's trainable heads; discriminator).

  generator      adv_loss_weight * adversarial + task_loss_weight * (CE + KL) + merge_sparsity_weight * sparsity
  discriminator  real vs fake on detached features

adversarial, two forms:
  non_saturating  D: softplus(-D(real)) + softplus(D(fake));  G: softplus(-D(fake))   (= -log sigmoid)
  hinge           D: relu(1 - D(real)) + relu(1 + D(fake));   G: -D(fake)
task: cross-entropy of the pruned model on the answer tokens, plus KL(full || pruned) of the
  next-token distributions at the same positions (the full model is the teacher).
sparsity: for each stage, (mean keep probability sigmoid(logit) over its candidate tokens - the
  configured keep fraction)^2. Top-k selection keeps exactly k anyway; this keeps the logits
  calibrated so that keep_mode "threshold" (sigmoid > keep_threshold) keeps about as many.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ADV_LOSSES = ("non_saturating", "hinge")


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_adv_loss(fake: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def discriminator_accuracy(real: torch.Tensor, fake: torch.Tensor) -> float:
    right = (real > 0).float().sum() + (fake < 0).float().sum()
    return float(right / (real.numel() + fake.numel()))


def task_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy on `targets`, KL(teacher || student)); logits [n, V] at the same positions.
    A missing part is a zero tensor."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    zero = logp.new_zeros(())
    ce = F.nll_loss(logp, targets) if targets is not None and targets.numel() else zero
    kl = zero
    if teacher_logits is not None and teacher_logits.numel():
        logq = F.log_softmax(teacher_logits.float(), dim=-1)
        kl = F.kl_div(logp, logq, log_target=True, reduction="batchmean")
    return ce, kl


def sparsity_loss(logits: torch.Tensor, candidates: torch.Tensor, keep: int) -> torch.Tensor:
    """logits [B, N] of one stage, candidates [B, N] bool (tokens it may keep), keep: target count."""
    p = torch.sigmoid(logits.float()).masked_fill(~candidates, 0.0)
    n = candidates.sum(1).clamp(min=1)
    return ((p.sum(1) / n - keep / n) ** 2).mean()
