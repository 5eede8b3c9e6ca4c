"""Which LoRAs the routed student has: the paper's general + per-pair, one shared, or per-pair only.

The structures of Table 2 at equal total rank R = r_gen + r_spe (what one pair's sample sees):

    mlas      general LoRA (r_gen) + one LoRA per pair (r_spe)     MLAS-LoRA (Eq. 9)
    shared    one LoRA for all pairs (rank R)                      the -R-* ablations
    per-pair  one LoRA per pair (rank R), no general LoRA          the -M-* ablations

A merged LoRA keeps the scaling alpha / r of the LoRA it replaces (alpha grows with the rank), so the
same lr moves every structure alike, and the shared structure is the plain LoRA baseline's update.
"""

from __future__ import annotations

from dataclasses import dataclass

STRUCTURES = ("mlas", "shared", "per-pair")


@dataclass(frozen=True)
class RoutedShape:
    r_gen: int
    r_spe: int
    alpha_gen: float
    alpha_spe: float


def routed_shape(lora) -> RoutedShape:
    """Ranks and alphas of the routed student for `lora` (r_gen, r_spe, alpha_*, structure)."""
    total = lora.r_gen + lora.r_spe
    if lora.structure == "shared":
        return RoutedShape(total, 0, lora.alpha_gen * total / lora.r_gen, lora.alpha_spe)
    if lora.structure == "per-pair":
        return RoutedShape(0, total, lora.alpha_gen, lora.alpha_spe * total / lora.r_spe)
    return RoutedShape(lora.r_gen, lora.r_spe, lora.alpha_gen, lora.alpha_spe)
