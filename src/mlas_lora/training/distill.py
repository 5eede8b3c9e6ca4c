"""Token-level distillation (beyond the paper): the student's next-token distribution pulled towards
the teacher's at the target positions, beside the cross-entropy on the references.

    loss = (1 - w) x CE(student, reference) + w x D(teacher || student)    (w = training.distill.weight)

with p = softmax(teacher / T), q = softmax(student / T), each mean over the target tokens, and D

    forward_kl  KL(p || q) = sum p (log p - log q)        (word-level KD, Kim and Rush 2016)
    reverse_kl  KL(q || p) = sum q (log q - log p)
    jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                (GKD's generalised JSD, Agarwal et al. ICLR 2024; TRL's generalized_jsd_loss)

Both models see the same batch; the teacher runs under no_grad and its logits, like the student's,
exist only at the target-predicting positions (`training.loss.predicting_positions`). The divergence
is computed a few rows at a time in float32 and its backward recomputes those rows, as
`TokenCrossEntropy` does, so no float32 copy of the [targets, vocab] logits is ever whole.
"""

from __future__ import annotations

import math

import torch

from mlas_lora.training.config import DistillConfig
from mlas_lora.training.loss import IGNORE, target_loss


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """Per-row divergence [rows] of [rows, vocab] logits (their dtype: float32 or float64)."""
    log_q = torch.log_softmax(student / config.temperature, dim=-1)
    log_p = torch.log_softmax(teacher / config.temperature, dim=-1)
    if config.divergence == "forward_kl":
        return _kl(log_p, log_q)
    if config.divergence == "reverse_kl":
        return _kl(log_q, log_p)
    beta = config.beta
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from the log-probabilities of finite logits (a model's)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


class TokenDivergence(torch.autograd.Function):
    """Per-row D(teacher || student) in float32 (or float64), a few rows at a time; returns [rows].
    The teacher's logits get no gradient."""

    CHUNK = 32

    @staticmethod
    def forward(ctx, student, teacher, config: DistillConfig):
        ctx.save_for_backward(student, teacher)
        ctx.config = config
        compute = torch.promote_types(student.dtype, torch.float32)
        out = torch.empty(student.shape[0], dtype=compute, device=student.device)
        for rows in torch.arange(student.shape[0], device=student.device).split(TokenDivergence.CHUNK):
            out[rows] = divergence_rows(student[rows].to(compute), teacher[rows].to(compute), config)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher = ctx.saved_tensors
        compute = torch.promote_types(student.dtype, torch.float32)
        grad = torch.empty_like(student)
        for rows in torch.arange(student.shape[0], device=student.device).split(TokenDivergence.CHUNK):
            chunk = student[rows].to(compute).requires_grad_(True)
            with torch.enable_grad():
                rows_div = divergence_rows(chunk, teacher[rows].to(compute), ctx.config)
                (chunk_grad,) = torch.autograd.grad(rows_div, chunk, grad_out[rows].to(compute))
            grad[rows] = chunk_grad.to(grad.dtype)
        return grad, None, None


def distill_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, config: DistillConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`target_loss` with the divergence mixed in: ((1 - w) CE + w D, per-row CE sums, counts).

    `logits` and `teacher_logits` are [targets, vocab] at the same positions (`predicting_positions`).
    At weight 0 (or without teacher logits) it is `target_loss` itself, bit for bit. The per-row sums
    stay the cross-entropy's: the progress bar and the log show how well the references are fitted.
    """
    ce, sums, counts = target_loss(logits, labels)
    if not config.enabled or teacher_logits is None:
        return ce, sums, counts
    student = logits.reshape(-1, logits.shape[-1])
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} do not match the student's {tuple(student.shape)}"
        )
    divergence = TokenDivergence.apply(student, teacher, config)
    tokens = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
    return (1 - config.weight) * ce + config.weight * divergence.sum() / tokens, sums, counts
