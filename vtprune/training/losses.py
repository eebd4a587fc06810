"""The training objectives (generator = the pruned model's trainable heads; discriminator).

  generator      adv_loss_weight * adversarial + task_loss_weight * (CE + KL) + merge_sparsity_weight * sparsity
  discriminator  real vs fake on detached features

adversarial, two forms:
  non_saturating  D: softplus(-D(real)) + softplus(D(fake));  G: softplus(-D(fake))   (= -log sigmoid)
  hinge           D: relu(1 - D(real)) + relu(1 + D(fake));   G: -D(fake)
task: cross-entropy of the pruned model on the answer tokens, plus KL(full || pruned) of the
  next-token distributions at the same positions (the full model is the teacher); averaged per
  token (config task_loss_average "token") or per example ("example").
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


def answer_weights(counts: torch.Tensor, average: str = "token") -> torch.Tensor | None:
    """Weights [n] (summing to 1) of a batch's answer positions, rows concatenated, from
    `counts` [B] (answer positions per row); None for "token" (task_losses' uniform mean).
    "example": each row's tokens share 1 / rows, so a one-word answer counts as much as a
    20-token caption (by token, SynthVQA's captions -- a third of the training records -- carry
    81% of the answer tokens)."""
    if average == "token":
        return None
    c = counts.float()
    per_row = torch.where(c > 0, 1.0 / (c.clamp(min=1) * (c > 0).sum()), torch.zeros_like(c))
    return per_row.repeat_interleave(counts)


def task_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor | None, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy on `targets`, KL(teacher || student)); logits [n, V] at the same positions,
    averaged with `weights` [n] (summing to 1; None: uniform). A missing part is a zero tensor."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    zero = logp.new_zeros(())
    n = logp.shape[0]
    if weights is None:
        weights = logp.new_full((n,), 1.0 / max(n, 1))
    weights = weights.to(logp.dtype)
    ce = zero
    if targets is not None and targets.numel():
        ce = -(weights * logp.gather(1, targets[:, None])[:, 0]).sum()
    kl = zero
    if teacher_logits is not None and teacher_logits.numel():
        logq = F.log_softmax(teacher_logits.float(), dim=-1)
        kl = (weights * (logq.exp() * (logq - logp)).sum(-1)).sum()
    return ce, kl


def sparsity_loss(logits: torch.Tensor, candidates: torch.Tensor, keep: int) -> torch.Tensor:
    """logits [B, N] of one stage, candidates [B, N] bool (tokens it may keep), keep: target count."""
    p = torch.sigmoid(logits.float()).masked_fill(~candidates, 0.0)
    n = candidates.sum(1).clamp(min=1)
    return ((p.sum(1) / n - keep / n) ** 2).mean()
