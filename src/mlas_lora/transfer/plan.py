"""Which teacher layers and which neurons each LoRA init is cut from: MLAS-LoRA and its ablations.

MLAS-LoRA (Sec. 3.2) takes the teacher layers of highest Eq. (1) relevance, cuts the shared general
LoRA's submatrix from the language-general neurons ranked by their mean awareness, and pair i's from
the neurons specific to pair i ranked by pair i's awareness. The ablations of Table 2 change one of
these choices at a time:

    layers        relevant (top-L by Eq. 1) | random (L teacher layers drawn with `seed`, sorted;
                  redrawn while they equal the relevant ones, so they never coincide)
    general_from  general (class -1) | all (every neuron: "no split", ranked by total awareness)
    pair_from     specific (class i) | general (class -1, ranked by pair i's awareness) | all
    order         awareness (rank by Phi) | random (rank by seeded random scores: a random subset
                  of the same candidates)

A set smaller than the student's side is filled by the same ranking from outside it (extract.py).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from math import comb

import torch
from torch import Tensor

from mlas_lora.awareness.classify import GENERAL_CLASS

LAYER_CHOICES = ("relevant", "random")
GENERAL_FROM = ("general", "all")
PAIR_FROM = ("specific", "general", "all")
ORDERS = ("awareness", "random")


@dataclass(frozen=True)
class InitPlan:
    """How the transfer stage picks layers and neurons (module docstring); defaults are the paper's."""

    layers: str = "relevant"
    general_from: str = "general"
    pair_from: str = "specific"
    order: str = "awareness"
    seed: int = 0
    """Seed of the random layer choice and of the random neuron order."""

    def problems(self) -> list[str]:
        out = []
        for name, value, known in (
            ("layers", self.layers, LAYER_CHOICES),
            ("general_from", self.general_from, GENERAL_FROM),
            ("pair_from", self.pair_from, PAIR_FROM),
            ("order", self.order, ORDERS),
        ):
            if value not in known:
                out.append(f"transfer.{name}: {value!r} (known: {', '.join(known)})")
        return out

    def changed(self) -> dict:
        """The fields that differ from the paper's plan (the part of a stage key they enter)."""
        default = InitPlan()
        return {k: v for k, v in vars(self).items() if v != getattr(default, k)}


PAPER_PLAN = InitPlan()
"""The paper's plan: relevant layers, general / specific neurons ranked by awareness."""


def choose_layers(plan: InitPlan, relevant: list[int], num_teacher_layers: int) -> list[int]:
    """The teacher layers feeding the student's, in order: the relevant ones, or a seeded random draw."""
    if plan.layers == "relevant":
        return list(relevant)
    k, rng = len(relevant), random.Random(plan.seed)
    while True:
        drawn = sorted(rng.sample(range(num_teacher_layers), k))
        if drawn != sorted(relevant) or comb(num_teacher_layers, k) == 1:
            return drawn


def init_ranking(plan: InitPlan, phi: Tensor, cls: Tensor, pair_index: int | None, where: str = ""):
    """(scores [N], candidates [N]) of one init on one matrix side: the general init (pair_index None)
    or pair i's. phi: [P, N] awareness; cls: [N] classes (-1 general, else the pair index)."""
    return ranking_scores(plan, phi, pair_index, where), candidates(plan, cls, pair_index)


def candidates(plan: InitPlan, cls: Tensor, pair_index: int | None) -> Tensor:
    """Bool mask of the neurons an init is cut from: the general init (pair_index None) or pair i's."""
    source = plan.general_from if pair_index is None else plan.pair_from
    if source == "all":
        return torch.ones_like(cls, dtype=torch.bool)
    return cls == (GENERAL_CLASS if source == "general" else pair_index)


def ranking_scores(plan: InitPlan, phi: Tensor, pair_index: int | None, where: str) -> Tensor:
    """What an init ranks its neurons by: mean Phi over pairs (general), pair i's Phi, or seeded noise.

    `where` ("layer.proj.side.name") seeds the random order, so each init and side draws its own.
    """
    if plan.order == "random":
        generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + zlib.crc32(where.encode()))
        return torch.rand(phi.shape[1], generator=generator)
    return phi.mean(dim=0) if pair_index is None else phi[pair_index]
