"""Language-general vs language-specific neurons (Sec. 3.1, App. A.6).

For a neuron with Eq. (2) scores Phi(s_i,t_i) over the P pairs:

    lambda_i = Phi(s_i,t_i) / sum_n Phi(s_n,t_n)

If max_i lambda_i > lambda (strictly) the neuron is specific to pair argmax_i (the first such pair
on ties), otherwise it is language-general. A neuron whose total score is 0 is general. Note that
max_i lambda_i >= 1/P always, so lambda below 1/P makes every scored neuron specific: every such
lambda gives the same classes, and the stages classify and key them as one
(`classification_lambda`), so a sweep trains those points once.

The paper's lambda = 0.2 was set for P = 14 pairs, where it sits a fraction
c = (0.2 - 1/14) / (1 - 1/14) = 0.138 of the way from the uniform share 1/P to a one-hot share 1.
With fewer pairs a fixed 0.2 stops meaning anything (for P <= 5 no neuron can be general), so
`lambda: auto` keeps that fraction instead: lambda(P) = 1/P + c (1 - 1/P), which is 0.2 at P = 14,
0.354 at P = 4 and 0.569 at P = 2. This rule is ours, not the paper's.

Per-pair normalisation (`normalize`, before the shares are taken). Phi sums |dL/dh * h| over a
pair's seed tokens, so raw sums favour a pair whose sentences tokenise longer (Estonian, Finnish) or
whose loss is higher: it would own more neurons for that alone. So each pair's Phi is first made
comparable:

    none     raw sums (the reading before this option existed)
    tokens   Phi_i / (real tokens scored for pair i): the mean per token (default)
    total    Phi_i / sum_j Phi_i,j over the neurons of that matrix side: every pair has the same
             total, so a constant factor on one pair's loss changes nothing

Files written by `save_classes(classes, dir)`:

    classes.safetensors   class.{l}.{p}.{in|out}  int64 [features]  (-1 general, else pair index)
    classes.json          {"lambda": 0.2, "normalize": "tokens", "pairs": [...], "summary": {...}}

The summary counts NEURON_DEFINITION's neurons: only in the teacher layers Eq. (1) kept, and an
input read by several projections (q/k/v read one tensor, gate/up another) once, under q / gate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlas_lora.awareness.neuron_awareness import SIDES, phi_key
from mlas_lora.awareness.scoring import AwarenessScores
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTIONS
from mlas_lora.stage_files import read_json, require_file, write_text_atomic

CLASSES_TENSORS = "classes.safetensors"
CLASSES_META = "classes.json"
GENERAL_CLASS = -1
"""Class id of a language-general neuron (any other class is the index of the pair that owns it)."""
NORMALIZATIONS = ("none", "tokens", "total")
NEURON_DEFINITION = (
    "a neuron is one coordinate of an activation that a projection reads (in) or writes (out), in the "
    "teacher layers kept by Eq. (1); an input read by several projections (q/k/v, gate/up) is counted once"
)
SHARED_INPUTS = {"k": "q", "v": "q", "up": "gate"}
"""Projections whose input is (in Qwen2, Llama, Gemma2) the same tensor as another's: counted under it."""


PAPER_LAMBDA, PAPER_PAIRS = 0.2, 14


def auto_lambda(num_pairs: int) -> float:
    """lambda for P pairs at the paper's distance from the uniform share (see the module docstring)."""
    if num_pairs < 1:
        raise MlasLoraError(f"auto lambda needs at least one pair, got {num_pairs}")
    uniform, paper_uniform = 1 / num_pairs, 1 / PAPER_PAIRS
    fraction = (PAPER_LAMBDA - paper_uniform) / (1 - paper_uniform)
    return uniform + fraction * (1 - uniform)


def lambda_problem(lam: object) -> str | None:
    """What is wrong with a configured lambda ('auto' or a number in [0, 1]), or None if nothing.

    The ends are allowed: 0 makes every scored neuron specific, 1 makes every neuron general.
    """
    if lam == "auto":
        return None
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0.0 <= lam <= 1.0:
        return f"must be a number in [0, 1] or 'auto', got {lam!r}"
    return None


def resolve_lambda(lam: float | str, num_pairs: int) -> float:
    """A configured lambda: a number as it is, or 'auto' -> `auto_lambda(num_pairs)`."""
    if problem := lambda_problem(lam):
        raise MlasLoraError(f"lambda {problem}")
    return round(auto_lambda(num_pairs), 6) if lam == "auto" else float(lam)


def classification_lambda(lam: float, num_pairs: int) -> float:
    """The lambda a classification of `num_pairs` pairs uses. Every lambda below 1/P classifies alike
    (module docstring; margin 1e-9 for the float64 shares), so all of them use one representative: the
    paper's 0.2 where it is itself below 1/P (P <= 4, so a run at the paper's value keeps its stage
    keys), else 0. Any other lambda is returned as it is."""
    uniform = 1 / num_pairs - 1e-9
    if lam >= uniform:
        return lam
    return PAPER_LAMBDA if PAPER_LAMBDA < uniform else 0.0


def class_key(layer: int, proj: str, side: str) -> str:
    return f"class.{layer}.{proj}.{side}"


@dataclass(frozen=True)
class NeuronClasses:
    """Per-neuron class (-1 general, else pair index) for every scored layer, projection and side."""

    pairs: list[str]
    lam: float
    classes: dict[str, torch.Tensor]  # class_key -> int64 [features]
    summary: dict
    normalize: str = "none"

    def of(self, layer: int, proj: str, side: str) -> torch.Tensor:
        return self.classes[class_key(layer, proj, side)]


def classify_scores(phi: torch.Tensor, lam: float = 0.2) -> torch.Tensor:
    """int64 [N] classes of N neurons from their scores phi [P, N] (float64 shares, strict `>`)."""
    phi = phi.to(torch.float64)
    total = phi.sum(0)
    share = phi / torch.where(total > 0, total, torch.ones_like(total))
    top, owner = share.max(0)
    specific = (total > 0) & (top > lam)
    return torch.where(specific, owner, torch.full_like(owner, GENERAL_CLASS))


def pair_divisors(
    pairs: list[str], num_tokens: dict[str, int], normalize: str, where: str = "awareness scores"
) -> torch.Tensor | None:
    """float64 [P] per-pair divisors of the `tokens` normalisation (None for `none` / `total`)."""
    if normalize not in NORMALIZATIONS:
        raise MlasLoraError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize != "tokens":
        return None
    missing = [p for p in pairs if num_tokens.get(p, 0) <= 0]
    if missing:
        raise MlasLoraError(
            f"{where}: normalize 'tokens' needs the scored token count of every pair; missing for "
            f"{missing} (awareness files from an older version: re-run the awareness stage)"
        )
    return torch.tensor([float(num_tokens[p]) for p in pairs], dtype=torch.float64)


def normalize_phi(phi: torch.Tensor, normalize: str, divisors: torch.Tensor | None = None) -> torch.Tensor:
    """Phi [P, N] made comparable across pairs (module docstring), in float64."""
    phi = phi.to(torch.float64)
    if normalize == "tokens":
        return phi / divisors.to(phi.device)[:, None]
    if normalize == "total":
        total = phi.sum(1, keepdim=True)
        return phi / torch.where(total > 0, total, torch.ones_like(total))
    if normalize != "none":
        raise MlasLoraError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return phi


def classify_neurons(scores: AwarenessScores, lam: float = 0.2, normalize: str = "none") -> NeuronClasses:
    """Classify every neuron of every scored layer; lambda is the paper's threshold (default 0.2).

    `normalize` makes each pair's Phi comparable first (module docstring); the summary counts only
    the selected layers' neurons, each once (NEURON_DEFINITION).
    """
    problem = "'auto' must be resolved first (resolve_lambda)" if lam == "auto" else lambda_problem(lam)
    if problem:
        raise MlasLoraError(f"lambda {problem}")
    divisors = pair_divisors(scores.pairs, scores.num_tokens, normalize)
    classes = {}
    for key, phi in scores.phi.items():
        _, layer, proj, side = key.split(".")
        classes[class_key(int(layer), proj, side)] = classify_scores(
            normalize_phi(phi, normalize, divisors), lam
        )
    counted = counted_keys(scores)
    summary = summarise({k: v for k, v in classes.items() if k in counted}, scores.pairs)
    return NeuronClasses(list(scores.pairs), lam, classes, summary, normalize)


def counted_keys(scores: AwarenessScores) -> set[str]:
    """class keys of NEURON_DEFINITION's neurons: selected layers, a shared input once (under q / gate).

    An input is treated as shared only where its scores equal the owner's bit for bit, which is how
    the awareness tap records a tensor read by several projections.
    """
    keys = set()
    for layer in scores.selected_layers:
        for proj in PROJECTIONS:
            owner = SHARED_INPUTS.get(proj)
            for side in SIDES:
                if side == "in" and owner is not None:
                    mine, theirs = (
                        scores.phi.get(phi_key(layer, proj, side)),
                        scores.phi.get(phi_key(layer, owner, side)),
                    )
                    if mine is not None and theirs is not None and torch.equal(mine, theirs):
                        continue
                if phi_key(layer, proj, side) in scores.phi:
                    keys.add(class_key(layer, proj, side))
    return keys


def summarise(classes: dict[str, torch.Tensor], pairs: list[str]) -> dict:
    """Counts of general and per-pair specific neurons: in total, per layer and per projection."""
    summary = {
        "neuron": NEURON_DEFINITION,
        "total": _empty(pairs),
        "per_layer": {},
        "per_projection": {p: _empty(pairs) for p in PROJECTIONS},
    }
    for key, labels in sorted(classes.items(), key=lambda kv: _sort_key(kv[0])):
        _, layer, proj, _ = key.split(".")
        counts = torch.bincount(labels + 1, minlength=len(pairs) + 1).tolist()
        for bucket in (
            summary["total"],
            summary["per_layer"].setdefault(layer, _empty(pairs)),
            summary["per_projection"][proj],
        ):
            bucket["general"] += counts[0]
            for i, pair in enumerate(pairs):
                bucket["specific"][pair] += counts[i + 1]
    return summary


def _empty(pairs) -> dict:
    return {"general": 0, "specific": {pair: 0 for pair in pairs}}


def _sort_key(key: str):
    _, layer, proj, side = key.split(".")
    return int(layer), PROJECTIONS.index(proj), SIDES.index(side)


def classification_summary(classes: NeuronClasses) -> str:
    """A printable table of the summary (what `mlas-lora classify` prints)."""
    pairs, summary = classes.pairs, classes.summary
    header = ["", "general", "specific"] + pairs
    rows = [[f"layer {layer}", *_cells(c, pairs)] for layer, c in summary["per_layer"].items()]
    rows += [[f"proj {proj}", *_cells(c, pairs)] for proj, c in summary["per_projection"].items()]
    rows.append(["total", *_cells(summary["total"], pairs)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"lambda = {classes.lam}, normalize = {classes.normalize}", f"({NEURON_DEFINITION})"]
    for row in [header, *rows]:
        lines.append(
            "  ".join(
                str(cell).rjust(w) if i else str(cell).ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _cells(counts: dict, pairs) -> list[int]:
    specific = [counts["specific"][pair] for pair in pairs]
    return [counts["general"], sum(specific), *specific]


def save_classes(classes: NeuronClasses, directory: str | Path) -> Path:
    """Write classes.safetensors and classes.json (format in the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.int64).contiguous() for k, v in classes.classes.items()},
        str(directory / CLASSES_TENSORS),
    )
    meta = {
        "lambda": classes.lam,
        "normalize": classes.normalize,
        "pairs": classes.pairs,
        "summary": classes.summary,
    }
    write_text_atomic(directory / CLASSES_META, json.dumps(meta, indent=2) + "\n")
    return directory


def load_classes(directory: str | Path) -> NeuronClasses:
    """Read what `save_classes` wrote."""
    directory = Path(directory)
    tensor_path = require_file(directory / CLASSES_TENSORS, "classify")
    meta_path = directory / CLASSES_META
    meta = read_json(meta_path, "classify")
    missing = [k for k in ("lambda", "pairs", "summary") if k not in meta]
    if missing:
        raise MlasLoraError(f"{meta_path}: missing keys {', '.join(missing)}")
    classes = load_file(str(tensor_path))
    out_of_range = [
        k
        for k, v in classes.items()
        if v.numel() and (v.min() < GENERAL_CLASS or v.max() >= len(meta["pairs"]))
    ]
    if out_of_range:
        raise MlasLoraError(
            f"{tensor_path}: {out_of_range[:5]} hold class ids outside -1..{len(meta['pairs']) - 1}"
        )
    return NeuronClasses(
        list(meta["pairs"]), float(meta["lambda"]), classes, meta["summary"], meta.get("normalize", "none")
    )
