"""MLAS-LoRA's trainable parameters, counted from shapes: the budget Table 1's baselines are sized to.

The routed student (Eq. 9) puts a general LoRA of rank r_gen and one LoRA of rank r_spe per pair on
every target projection of every layer; a LoRA of rank r on a [out, in] weight trains r (in + out)
parameters. So, for P pairs and L layers,

    params = L * sum over targets (in + out) * (r_gen + P r_spe)

(with the ranks of `routed_shape`, so the -R-* / -M-* structures are counted right too). Baselines
that are not LoRAs (a prefix, bottleneck adapters) choose their size from this number, so the
Params column of Table 1 compares like with like.
"""

from __future__ import annotations

from mlas_lora.adapters.structure import routed_shape
from mlas_lora.models.arch import ArchInfo


def budget_rank(lora, n_pairs: int) -> int:
    """r_gen + P r_spe: a rank whose LoRA, r (d_in + d_out) parameters per projection, has exactly
    MLAS-LoRA's trainable count at the same `lora` section (one general LoRA plus P pair LoRAs, with
    the ranks of its structure: `routed_shape`)."""
    shape = routed_shape(lora)
    return shape.r_gen + n_pairs * shape.r_spe


def mlas_lora_parameters(arch: ArchInfo, lora, n_pairs: int) -> int:
    """Trainable parameters of the routed student for the `lora` section and `n_pairs` pairs."""
    per_rank = sum(sum(arch.projection_shape(t)) for t in lora.targets)
    return arch.num_layers * per_rank * budget_rank(lora, n_pairs)


def budget_settings(lora) -> dict:
    """The `lora` settings the budget is computed from: the training-key part of a baseline sized to it."""
    return {
        "r_gen": lora.r_gen,
        "r_spe": lora.r_spe,
        "targets": list(lora.targets),
        "structure": lora.structure,
    }
