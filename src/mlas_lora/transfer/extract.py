"""Eq. (4)-(5): cut a student-shaped submatrix out of a teacher projection by neuron awareness.

    teacher W_T (M x N)            rows: out-side neurons, ranked by Phi_out
    ┌───────────────┐              cols: in-side neurons,  ranked by Phi_in
    │ ■  ■    ■     │  ──pick m rows, n cols──►  W_s (m x n)  ──SVD──► LoRA init (svd_init.py)
    └───────────────┘

For the general LoRA the candidates are the language-general neurons (class -1) ranked by the
awareness averaged over all pairs; for pair i's LoRA the candidates are the neurons specific to
pair i ranked by pair i's awareness. When a set holds fewer neurons than needed, the best
remaining neurons by the same ranking fill it, and the count is recorded ("filled").

Head rule (attention). The teacher and student differ in heads and head_dim (Qwen2.5-1.5B -> 0.5B:
q 12 x 128 -> 14 x 64, k/v 2 x 128 -> 2 x 64), so rows of q/k/v and columns of o are chosen with
the head structure in mind ("gqa-rotary"):

* GQA groups are kept: student q heads of kv group g (and student k/v head g) are built only from
  teacher q heads of group g (teacher k/v head g), since the heads of group g attend to k/v head g.
* Each student head is one "slot": head_dim_S / 2 RoPE rotary pairs (dims j and j + head_dim_T / 2)
  taken from ONE teacher head. The slot's dims are laid out as [first halves sorted, second halves
  in the same order], so student dims i and i + head_dim_S / 2 are a teacher rotary pair and the
  student's rotate_half acts on a real rotation plane of the teacher.
* Within a teacher head, rotary pairs are ranked (candidate dims first, then the summed awareness
  of the two dims) and cut into consecutive slots; within a group the best slots win, so a teacher
  head may give several student heads (1.5B -> 0.5B: 6 teacher heads x 2 slots cover 7 student
  heads per group). Chosen slots are ordered by (teacher head, slot rank).
* The o projection's columns (its input is the concatenated heads) follow the rule of q's rows,
  scored by o's own input awareness.
* If the kv group counts differ, a head_dim is odd, the student head_dim exceeds the teacher's, or a
  group has too few slots, the side falls back to plain ranking and the rule says why.

RoPE frequencies are not matched exactly (student dim i has frequency theta^(-2i/d_S), the teacher
dim it came from theta^(-2j/d_T)); their order is kept because slot dims are sorted. Hidden-side
indices (q/k/v/gate/up columns, o/down rows) and MLP-intermediate indices use plain ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import ArchInfo

PLAIN = "plain"
HEAD_RULE = "gqa-rotary"


@dataclass(frozen=True)
class Selection:
    """Teacher indices chosen for one side of a submatrix, in the order the student uses them."""

    indices: Tensor  # int64 [k]
    n_filled: int  # chosen neurons outside the candidate set
    score: float  # sum of the ranking scores of the chosen neurons
    rule: str  # "plain", "gqa-rotary", or "plain (<why the head rule did not apply>)"


@dataclass(frozen=True)
class HeadLayout:
    """How a projection side splits into kv groups x heads per group x head_dim."""

    groups: int
    heads: int
    head_dim: int


def rank_indices(scores: Tensor, candidates_mask: Tensor, k: int) -> tuple[Tensor, int]:
    """The k best indices: candidates by descending score, then the best others fill; sorted.

    Ties go to the lower index, so the choice is deterministic. Returns (indices, n_filled).
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise MlasLoraError(f"cannot choose {k} neurons out of {n}")
    if not torch.isfinite(scores).all():
        raise MlasLoraError("awareness scores contain NaN or inf; recompute the awareness stage")
    by_score = torch.sort(scores, descending=True, stable=True).indices
    outsider = (~candidates_mask[by_score]).to(torch.int8)
    order = by_score[torch.sort(outsider, stable=True).indices]
    n_filled = max(0, k - int(candidates_mask.sum()))
    return torch.sort(order[:k]).values, n_filled


def extract_submatrix(weight: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Eq. (4)-(5): W_s = W_T[rows][:, cols] in float32 (indexing first keeps bf16 teachers cheap)."""
    return weight.index_select(0, rows).index_select(1, cols).to(torch.float32)


def head_layouts(proj: str, teacher: ArchInfo, student: ArchInfo) -> tuple[HeadLayout, HeadLayout]:
    """Head layouts of q/o (heads grouped by kv head) or k/v (one head per group)."""
    if proj in ("q", "o"):
        return tuple(
            HeadLayout(a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim) for a in (teacher, student)
        )
    return tuple(HeadLayout(a.num_kv_heads, 1, a.head_dim) for a in (teacher, student))


def head_rule_fallback(teacher: HeadLayout, student: HeadLayout) -> str | None:
    """Why the head rule cannot apply to this pair of layouts, or None when it can."""
    if teacher.groups != student.groups:
        return f"kv groups differ: teacher {teacher.groups}, student {student.groups}"
    if teacher.head_dim % 2 or student.head_dim % 2:
        return f"odd head_dim: teacher {teacher.head_dim}, student {student.head_dim}"
    if student.head_dim > teacher.head_dim:
        return f"student head_dim {student.head_dim} > teacher head_dim {teacher.head_dim}"
    slots = teacher.heads * (teacher.head_dim // student.head_dim)
    if slots < student.heads:
        return f"{slots} teacher slots per group < {student.heads} student heads"
    return None


def _head_slots(scores: Tensor, mask: Tensor, start: int, t_dim: int, s_dim: int) -> list:
    """Slots of one teacher head: ((candidate count, score), rows laid out as a student head)."""
    t_half, s_half = t_dim // 2, s_dim // 2
    first = start + torch.arange(t_half)
    pair_score = scores[first] + scores[first + t_half]
    pair_cand = mask[first].to(torch.int64) + mask[first + t_half].to(torch.int64)
    order = torch.sort(pair_score, descending=True, stable=True).indices
    order = order[torch.sort(pair_cand[order], descending=True, stable=True).indices]
    slots = []
    for j in range(t_half // s_half):
        picked = order[j * s_half : (j + 1) * s_half]
        dims = torch.sort(first[picked]).values
        key = (int(pair_cand[picked].sum()), float(pair_score[picked].sum()))
        slots.append((key, torch.cat([dims, dims + t_half])))
    return slots


def select_head_rows(scores: Tensor, mask: Tensor, teacher: HeadLayout, student: HeadLayout) -> Selection:
    """The head rule (module docstring): best slots of each kv group, one slot per student head."""
    chosen = []
    for g in range(teacher.groups):
        offers = []
        for t in range(g * teacher.heads, (g + 1) * teacher.heads):
            slots = _head_slots(scores, mask, t * teacher.head_dim, teacher.head_dim, student.head_dim)
            offers += [(key, (t, j), rows) for j, (key, rows) in enumerate(slots)]
        best = sorted(offers, key=lambda o: (-o[0][0], -o[0][1], o[1]))[: student.heads]
        chosen += [rows for _, _, rows in sorted(best, key=lambda o: o[1])]
    indices = torch.cat(chosen)
    n_filled = int((~mask[indices]).sum())
    return Selection(indices, n_filled, float(scores[indices].sum()), HEAD_RULE)


def is_head_side(proj: str, side: str) -> bool:
    """Whether this side of the projection is indexed by attention heads (q/k/v rows, o columns)."""
    return (proj in ("q", "k", "v") and side == "out") or (proj == "o" and side == "in")


def select_side(
    proj: str, side: str, scores: Tensor, mask: Tensor, teacher: ArchInfo, student: ArchInfo
) -> Selection:
    """Eq. (4) (side "out", rows) or Eq. (5) (side "in", columns) for one projection and one init."""
    axis = {"out": 0, "in": 1}[side]
    n_teacher = teacher.projection_shape(proj)[axis]
    k = student.projection_shape(proj)[axis]
    if scores.shape != (n_teacher,) or mask.shape != (n_teacher,):
        raise MlasLoraError(
            f"{proj}.{side}: expected awareness and classes of shape ({n_teacher},), "
            f"got {tuple(scores.shape)} and {tuple(mask.shape)}"
        )
    rule = PLAIN
    if is_head_side(proj, side):
        t_layout, s_layout = head_layouts(proj, teacher, student)
        reason = head_rule_fallback(t_layout, s_layout)
        if reason is None:
            return select_head_rows(scores, mask, t_layout, s_layout)
        rule = f"{PLAIN} ({reason})"
    indices, n_filled = rank_indices(scores, mask, k)
    return Selection(indices, n_filled, float(scores[indices].sum()), rule)


def general_ranking(phi: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Scores and candidates of the general init: mean awareness over pairs, class -1 neurons."""
    return phi.mean(dim=0), classes == -1


def specific_ranking(phi: Tensor, classes: Tensor, pair_index: int) -> tuple[Tensor, Tensor]:
    """Scores and candidates of pair i's init: pair i's awareness, neurons specific to pair i."""
    return phi[pair_index], classes == pair_index
