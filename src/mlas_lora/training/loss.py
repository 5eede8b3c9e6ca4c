"""Next-token cross-entropy on target tokens only, with logits computed only where they are needed.

Training and awareness scoring both put the loss on the target side of a prompt + target
sequence. Two things keep that cheap on a 152k vocabulary:

- the model is asked for logits only at the positions that predict a target token (a boolean
  `logits_to_keep`), so the vocabulary projection skips every prompt and padding position;
- `TokenCrossEntropy` keeps only those logits for backward and recomputes the softmax a few rows
  at a time, instead of holding a float32 log-softmax of them (plus two more float32 tensors of
  that size in backward, as `F.cross_entropy(logits.float())` does).
"""

from __future__ import annotations

import torch

IGNORE = -100
"""Label of a position that carries no loss (prompt, padding)."""


class TokenCrossEntropy(torch.autograd.Function):
    """Per-row CE(logits_r, label_r) in float32 (or float64), a few rows at a time; returns [rows]."""

    CHUNK = 32

    @staticmethod
    def forward(ctx, logits, labels):
        ctx.save_for_backward(logits, labels)
        compute = torch.promote_types(logits.dtype, torch.float32)
        nll = torch.empty(logits.shape[0], dtype=compute, device=logits.device)
        for rows in torch.arange(logits.shape[0], device=logits.device).split(TokenCrossEntropy.CHUNK):
            chunk = logits[rows].to(compute)
            nll[rows] = chunk.logsumexp(-1) - chunk.gather(1, labels[rows, None]).squeeze(1)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in torch.arange(logits.shape[0], device=logits.device).split(TokenCrossEntropy.CHUNK):
            probs = logits[rows].to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
            probs[torch.arange(len(rows), device=rows.device), labels[rows]] -= 1
            grad[rows] = (probs * grad_nll[rows, None]).to(grad.dtype)
        return grad, None


def predicting_positions(targets: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: positions whose next token is a target (pass as `logits_to_keep`).

    `targets` is the [batch, seq] bool mask of target tokens (`labels != IGNORE` for labels).
    """
    keep = torch.zeros_like(targets, dtype=torch.bool)
    keep[:, :-1] = targets[:, 1:]
    return keep


def target_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-token loss over the target tokens, plus per-row loss sums and token counts (float32).

    `logits` are [targets, vocab], the model's output at `predicting_positions(labels != IGNORE)`, in row-major
    order (what a boolean `logits_to_keep` returns); `labels` are [batch, seq] with IGNORE off target.
    """
    shifted = labels[:, 1:]
    targets = shifted != IGNORE
    nll = TokenCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), shifted[targets])
    counts = targets.sum(dim=1)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[targets]
    sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll.detach())
    return nll.sum() / counts.sum().clamp(min=1), sums, counts
