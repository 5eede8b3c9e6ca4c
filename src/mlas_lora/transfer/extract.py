"""Eq. (4)-(5): cut a student-shaped submatrix out of a teacher projection by neuron awareness.

    teacher W_T (M x N)            rows: out-side neurons, ranked by Phi_out
    ┌───────────────┐              cols: in-side neurons,  ranked by Phi_in
    │ ■  ■    ■     │  ──pick m rows, n cols──►  W_s (m x n)  ──SVD──► LoRA init (svd_init.py)
    └───────────────┘

For the general LoRA the candidates are the language-general neurons (class -1) ranked by the
awareness averaged over all pairs; for pair i's LoRA the candidates are the neurons specific to
pair i ranked by pair i's awareness. When a set holds fewer neurons than needed, the best
remaining neurons by the same ranking fill it, and the count is recorded ("filled").

Fill rules (`FILL_RULES`, config `lora.fill_rule`). A pair with few specific neurons fills from the
top of its own ranking, which largely overlaps the general init's choice, so the two LoRAs would
start from nearly the same teacher component. `ranked` (the default) fills by the ranking alone;
`exclude-general` fills from the neurons the general init of the same matrix side did not choose,
and takes general ones only when too few others remain (the record then says how many). The pair's
own specific neurons always come first, even those the general init took by its own fill.

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
* Under `exclude-general`, a rotary pair holding dims the general init chose (and that are not the
  pair's candidates) ranks after every other pair with as many candidate dims, and a slot's key
  counts those dims too (after its candidate count), so a pair's slots take the general init's dims
  where the group has too few others (1.5B -> 0.5B q: 768 dims a group, 448 chosen by each init, so
  >= 128 shared), or where a slot taken for its candidate dims carries them along.
* If the kv group counts differ, a head_dim is odd, the student head_dim exceeds the teacher's, or a
  group has too few slots, the side falls back to plain ranking and the rule says why.

RoPE frequencies are not matched exactly (student dim i has frequency theta^(-2i/d_S), the teacher
dim it came from theta^(-2j/d_T)); their order is kept because slot dims are sorted. Hidden-side
indices (q/k/v/gate/up columns, o/down rows) and MLP-intermediate indices use plain ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import ArchInfo
from mlas_lora.transfer.plan import PAPER_PLAN, init_ranking

PLAIN = "plain"
HEAD_RULE = "gqa-rotary"
RANKED, EXCLUDE_GENERAL = "ranked", "exclude-general"
FILL_RULES = (RANKED, EXCLUDE_GENERAL)


@dataclass(frozen=True)
class Selection:
    """Teacher indices chosen for one side of a submatrix, in the order the student uses them."""

    indices: Tensor  # int64 [k]
    n_filled: int  # chosen neurons outside the candidate set
    score: float  # sum of the ranking scores of the chosen neurons
    rule: str  # "plain", "gqa-rotary", or "plain (<why the head rule did not apply>)"
    n_filled_avoided: int = 0  # filled neurons taken from `avoid` for lack of others


@dataclass(frozen=True)
class HeadLayout:
    """How a projection side splits into kv groups x heads per group x head_dim."""

    groups: int
    heads: int
    head_dim: int


def rank_indices(
    scores: Tensor, candidates_mask: Tensor, k: int, avoid: Tensor | None = None
) -> tuple[Tensor, int]:
    """The k best indices: candidates by descending score, then the best others fill; sorted.

    `avoid` (a mask) pushes non-candidates to the end of the fill: they are taken only when the
    other neurons run out. Ties go to the lower index, so the choice is deterministic. Returns
    (indices, n_filled).
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise MlasLoraError(f"cannot choose {k} neurons out of {n}")
    if not torch.isfinite(scores).all():
        raise MlasLoraError("awareness scores contain NaN or inf; recompute the awareness stage")
    by_score = torch.sort(scores, descending=True, stable=True).indices
    tier = fill_tier(candidates_mask, avoid)[by_score]
    order = by_score[torch.sort(tier, stable=True).indices]
    n_filled = max(0, k - int(candidates_mask.sum()))
    return torch.sort(order[:k]).values, n_filled


def fill_tier(candidates_mask: Tensor, avoid: Tensor | None) -> Tensor:
    """0 for candidates, 1 for other neurons, 2 for non-candidates in `avoid`: the order of the fill."""
    outsider = (~candidates_mask).to(torch.int8)
    if avoid is None:
        return outsider
    return outsider + (outsider.bool() & avoid).to(torch.int8)


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


def _head_slots(scores: Tensor, mask: Tensor, avoided: Tensor, start: int, t_dim: int, s_dim: int) -> list:
    """Slots of one teacher head: ((candidates, -avoided, score), rows laid out as a student head).

    `avoided` marks the non-candidate dims the fill should avoid (all False under the ranked rule).
    """
    t_half, s_half = t_dim // 2, s_dim // 2
    first = start + torch.arange(t_half)
    pair_score = scores[first] + scores[first + t_half]
    pair_cand = mask[first].to(torch.int64) + mask[first + t_half].to(torch.int64)
    pair_avoided = avoided[first].to(torch.int64) + avoided[first + t_half].to(torch.int64)
    order = torch.sort(pair_score, descending=True, stable=True).indices
    order = order[torch.sort(pair_avoided[order], stable=True).indices]
    order = order[torch.sort(pair_cand[order], descending=True, stable=True).indices]
    slots = []
    for j in range(t_half // s_half):
        picked = order[j * s_half : (j + 1) * s_half]
        dims = torch.sort(first[picked]).values
        key = (
            int(pair_cand[picked].sum()),
            -int(pair_avoided[picked].sum()),
            float(pair_score[picked].sum()),
        )
        slots.append((key, torch.cat([dims, dims + t_half])))
    return slots


def select_head_rows(
    scores: Tensor, mask: Tensor, teacher: HeadLayout, student: HeadLayout, avoid: Tensor | None = None
) -> Selection:
    """The head rule (module docstring): best slots of each kv group, one slot per student head."""
    avoided = fill_tier(mask, avoid) == 2
    chosen = []
    for g in range(teacher.groups):
        offers = []
        for t in range(g * teacher.heads, (g + 1) * teacher.heads):
            slots = _head_slots(
                scores, mask, avoided, t * teacher.head_dim, teacher.head_dim, student.head_dim
            )
            offers += [(key, (t, j), rows) for j, (key, rows) in enumerate(slots)]
        best = sorted(offers, key=lambda o: (-o[0][0], -o[0][1], -o[0][2], o[1]))[: student.heads]
        chosen += [rows for _, _, rows in sorted(best, key=lambda o: o[1])]
    indices = torch.cat(chosen)
    n_filled = int((~mask[indices]).sum())
    return Selection(indices, n_filled, float(scores[indices].sum()), HEAD_RULE, int(avoided[indices].sum()))


def is_head_side(proj: str, side: str) -> bool:
    """Whether this side of the projection is indexed by attention heads (q/k/v rows, o columns)."""
    return (proj in ("q", "k", "v") and side == "out") or (proj == "o" and side == "in")


def select_side(
    proj: str,
    side: str,
    scores: Tensor,
    mask: Tensor,
    teacher: ArchInfo,
    student: ArchInfo,
    avoid: Tensor | None = None,
) -> Selection:
    """Eq. (4) (side "out", rows) or Eq. (5) (side "in", columns) for one projection and one init.

    avoid: neurons the fill takes last (the general init's choice under `exclude-general`).
    """
    axis = {"out": 0, "in": 1}[side]
    n_teacher = teacher.projection_shape(proj)[axis]
    k = student.projection_shape(proj)[axis]
    if (
        scores.shape != (n_teacher,)
        or mask.shape != (n_teacher,)
        or (avoid is not None and avoid.shape != mask.shape)
    ):
        raise MlasLoraError(
            f"{proj}.{side}: expected awareness and classes of shape ({n_teacher},), "
            f"got {tuple(scores.shape)} and {tuple(mask.shape)}"
        )
    rule = PLAIN
    if is_head_side(proj, side):
        t_layout, s_layout = head_layouts(proj, teacher, student)
        reason = head_rule_fallback(t_layout, s_layout)
        if reason is None:
            return select_head_rows(scores, mask, t_layout, s_layout, avoid)
        rule = f"{PLAIN} ({reason})"
    indices, n_filled = rank_indices(scores, mask, k, avoid)
    n_avoided = 0 if avoid is None else int((avoid & ~mask)[indices].sum())
    return Selection(indices, n_filled, float(scores[indices].sum()), rule, n_avoided)


def general_ranking(phi: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Scores and candidates of the paper's general init: mean awareness over pairs, class -1 neurons."""
    return init_ranking(PAPER_PLAN, phi, classes, None)


def specific_ranking(phi: Tensor, classes: Tensor, pair_index: int) -> tuple[Tensor, Tensor]:
    """Scores and candidates of the paper's init of pair i: pair i's awareness, neurons specific to i."""
    return init_ranking(PAPER_PLAN, phi, classes, pair_index)


def index_mask(indices: Tensor, n: int) -> Tensor:
    """Bool mask [n] that is True at `indices` (the fill's `avoid` from another init's choice)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[indices] = True
    return mask


def overlap(indices: Tensor, reference: Tensor, candidates_mask: Tensor) -> dict:
    """How many of `indices` the reference choice also holds: count, fraction, and how many of those
    came from the fill (non-candidates) rather than from the init's own neurons."""
    shared = torch.isin(indices, reference)
    in_fill = int((shared & ~candidates_mask[indices]).sum())
    count = int(shared.sum())
    return {"count": count, "fraction": count / max(indices.numel(), 1), "in_fill": in_fill}


SIDES = {"out": "rows", "in": "cols"}


def choose_init(
    proj: str,
    sides: dict[str, tuple[Tensor, Tensor]],
    general: dict[str, Selection],
    fill_rule: str,
    teacher: ArchInfo,
    student: ArchInfo,
) -> dict[str, Selection]:
    """Eq. (4)-(5) for one init: its rows (side "out") and columns (side "in").

    sides: side -> (scores, candidates); general: the general init's choice (empty when choosing
    the general init itself), which a pair's fill avoids under `exclude-general`.
    """
    chosen = {}
    for side in SIDES:
        scores, mask = sides[side]
        avoid = None
        if general and fill_rule == EXCLUDE_GENERAL:
            avoid = index_mask(general[side].indices, mask.numel())
        chosen[side] = select_side(proj, side, scores, mask, teacher, student, avoid)
    return chosen


def overlap_record(
    chosen: dict[str, Selection], general: dict[str, Selection], sides: dict, fill_rule: str
) -> dict:
    """transfer.json fields of a pair's init: overlap with the general init per side, and the fill
    rule as it applied (with how many fill neurons had to come from the general choice)."""
    record = {}
    for side, axis in SIDES.items():
        record[f"overlap_{axis}"] = overlap(chosen[side].indices, general[side].indices, sides[side][1])
        forced, why = chosen[side].n_filled_avoided, "too few others"
        if chosen[side].rule == HEAD_RULE:
            why = "too few others in the chosen head slots"
        note = f" ({forced} filled from the general init's choice: {why})" if forced else ""
        record[f"fill_rule_{axis}"] = fill_rule + note
    return record


def overlap_summary(submatrices: dict, pairs: Sequence[str], targets: Sequence[str]) -> dict:
    """{pair: {proj: {"rows": f, "cols": f}}}: mean over layers of the overlap fractions.

    A fraction is the share of a pair's chosen rows (columns) that the general init of the same
    matrix also chose; submatrices are transfer.json's records keyed `{layer}.{proj}.{name}`.
    """
    summary = {}
    for pair in pairs:
        for proj in targets:
            recs = [
                r for k, r in submatrices.items() if k.split(".")[1:] == [proj, pair] and "overlap_rows" in r
            ]
            if recs:
                summary.setdefault(pair, {})[proj] = {
                    axis: sum(r[f"overlap_{axis}"]["fraction"] for r in recs) / len(recs)
                    for axis in SIDES.values()
                }
    return summary
