"""Eq. (7)-(8): LoRA factors from the SVD of an extracted teacher submatrix.

    W_s = U S V^T                  (Eq. 7, float32, thin SVD)
    B = U[:, :r] S[:r, :r]         (Eq. 8, m x r)
    A = V^T[:r, :]                 (Eq. 8, r x n)

B @ A is the best rank-r approximation of W_s (Eckart-Young), so the LoRA starts from the
teacher's strongest directions in that submatrix. The fraction of W_s's Frobenius energy that
rank r keeps, sum(S[:r]^2) / sum(S^2), tells how much of the submatrix the init carries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlas_lora.errors import MlasLoraError


def energy_kept(singular_values: Tensor, rank: int) -> float:
    """sum(S[:r]^2) / sum(S^2); a zero matrix keeps everything (1.0) since nothing is lost."""
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    return 1.0 if total == 0.0 else float(squares[:rank].sum()) / total


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (7) thin SVD; a wide matrix goes through its transpose, which CPU LAPACK does ~50x faster."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
    return vh.T, s, u.T


def svd_factors(submatrix: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Eq. (7)-(8): (B [m, r], A [r, n], energy kept) of a submatrix, all float32.

    A rank above min(m, n) cannot come from the SVD and is an error, not silently clamped.
    """
    m, n = submatrix.shape
    if not 1 <= rank <= min(m, n):
        raise MlasLoraError(
            f"LoRA rank {rank} must be between 1 and min(m, n) = {min(m, n)} for a {m}x{n} submatrix"
        )
    u, s, vh = thin_svd(submatrix.to(torch.float32))
    b = (u[:, :rank] * s[:rank]).contiguous()
    a = vh[:rank].contiguous()
    return b, a, energy_kept(s, rank)
