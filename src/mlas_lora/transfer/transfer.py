"""Transfer stage driver: awareness + classes + teacher weights -> SVD-initialised LoRA factors.

For every student layer j (fed by teacher layer selected_layers[j], or by the layers the InitPlan
draws: plan.py) and every target projection,
Eq. (4)-(5) (extract.py) cut one submatrix for the general LoRA and one per language pair, and
Eq. (7)-(8) (svd_init.py) turn each into (B, A). Only the selected teacher layers are read, one
projection at a time; a teacher given as a checkpoint directory is read tensor by tensor from its
safetensors files, so a 1.5B teacher never sits in memory whole.

Inputs (awareness stage): awareness.safetensors (`phi.{l}.{p}.in|out` [P, N]) + awareness.json
(`pairs`, `selected_layers`); classes.safetensors (`class.{l}.{p}.in|out` int64 [N], -1 general,
else the index of the pair in awareness.json's `pairs`) + classes.json.

Outputs: factors.safetensors (`{l}.{p}.{name}.B` [m, r], `.A` [r, n], float32; l is the student
layer, name is "general" or a pair), indices.safetensors (`{l}.{p}.{name}.rows` / `.cols`, int64:
the teacher indices each submatrix was cut from) and transfer.json (pairs, ranks, targets, layer map,
fill rule, one record per submatrix: awareness score, filled counts, head rule, energy kept, and for
a pair its overlap with the general init's rows / columns; `overlap_with_general` averages those
fractions over layers per pair and projection).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlas_lora.awareness.classify import normalize_phi, pair_divisors
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import (
    PROJECTION_PATHS,
    PROJECTIONS,
    ArchInfo,
    decoder_layers,
    describe,
    projection,
)
from mlas_lora.progress import progress_bar
from mlas_lora.stage_files import read_json, require_file, write_text_atomic
from mlas_lora.transfer.extract import (
    FILL_RULES,
    RANKED,
    choose_init,
    extract_submatrix,
    overlap_record,
    overlap_summary,
)
from mlas_lora.transfer.plan import PAPER_PLAN, InitPlan, choose_layers, init_ranking
from mlas_lora.transfer.svd_init import svd_factors

GENERAL = "general"
FORMAT = "mlas-lora-transfer/1"


@dataclass(eq=False)
class Factors(Mapping):
    """LoRA inits: factors[(student_layer, proj)][name] = (B [m, r], A [r, n]); name: general or a pair.

    A read-only mapping over `tensors`, so it goes straight into `adapters.init_from_factors`;
    `indices` holds the teacher (rows, cols) of each submatrix and `meta` what transfer.json holds.
    """

    tensors: dict[tuple[int, str], dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    indices: dict[tuple[int, str], dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key: tuple[int, str]) -> dict[str, tuple[Tensor, Tensor]]:
        return self.tensors[key]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class AwarenessInputs:
    """Lazy reader of the awareness stage's files; every missing piece is a clear error."""

    def __init__(self, awareness_dir: str | Path, classes_dir: str | Path):
        self.phi_path = Path(awareness_dir) / "awareness.safetensors"
        self.cls_path = Path(classes_dir) / "classes.safetensors"
        info = read_json(Path(awareness_dir) / "awareness.json", "awareness")
        self.pairs = list(info.get("pairs") or [])
        self.selected_layers = list(info.get("selected_layers") or [])
        classes_info = read_json(Path(classes_dir) / "classes.json", "classify")
        if classes_info.get("pairs", self.pairs) != self.pairs:
            raise MlasLoraError(
                f"{classes_dir}/classes.json pairs {classes_info['pairs']} differ from "
                f"{awareness_dir}/awareness.json pairs {self.pairs}"
            )
        self.classes_info = classes_info
        self.normalize = classes_info.get("normalize", "none")
        self._divisors = pair_divisors(
            self.pairs, info.get("num_tokens") or {}, self.normalize, f"{awareness_dir}/awareness.json"
        )
        self._phi = _open(self.phi_path, "awareness")
        self._cls = _open(self.cls_path, "classify")

    def side(self, layer: int, proj: str, side: str) -> tuple[Tensor, Tensor]:
        """(Phi [P, N] float32, class [N] int64) of one side of a teacher projection.

        Phi is normalised per pair as the classes were (classes.json `normalize`), so the general
        ranking's mean over pairs weighs every pair as the classification did.
        """
        raw = _get(self._phi, self.phi_path, f"phi.{layer}.{proj}.{side}")
        phi = normalize_phi(raw, self.normalize, self._divisors).to(torch.float32)
        cls = _get(self._cls, self.cls_path, f"class.{layer}.{proj}.{side}").to(torch.int64)
        if phi.ndim != 2 or phi.shape[0] != len(self.pairs) or cls.shape != phi.shape[1:]:
            raise MlasLoraError(
                f"phi.{layer}.{proj}.{side} {tuple(phi.shape)} / class {tuple(cls.shape)}: expected "
                f"[{len(self.pairs)}, N] and [N] ({self.phi_path}, {self.cls_path})"
            )
        if cls.numel() and (cls.min() < -1 or cls.max() >= len(self.pairs)):
            raise MlasLoraError(f"class.{layer}.{proj}.{side} in {self.cls_path} has values outside [-1, P)")
        return phi, cls


def _open(path: Path, stage: str):
    return safe_open(str(require_file(path, stage)), framework="pt")


def _get(handle, path: Path, key: str) -> Tensor:
    if key not in handle.keys():
        raise MlasLoraError(f"{path} has no tensor {key!r}")
    return handle.get_tensor(key)


class ModuleWeights:
    """Teacher projections read from a loaded transformers model."""

    def __init__(self, model):
        self.info = describe(model)
        self._layers = decoder_layers(model)

    def weight(self, layer: int, proj: str) -> Tensor:
        return projection(self._layers[layer], proj).weight.detach()


class CheckpointWeights:
    """Teacher projections read one tensor at a time from a Hugging Face safetensors checkpoint."""

    def __init__(self, path: str | Path):
        from transformers import AutoConfig

        self.path = Path(path)
        self.info = describe(AutoConfig.from_pretrained(self.path))
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise MlasLoraError(f"{self.path} holds no *.safetensors weights")
        self._where = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                self._where.update(dict.fromkeys(handle.keys(), file))

    def weight(self, layer: int, proj: str) -> Tensor:
        suffix = f"layers.{layer}.{PROJECTION_PATHS[proj]}.weight"
        keys = [k for k in self._where if k.endswith(suffix) and "vision" not in k]
        if len(keys) != 1:
            raise MlasLoraError(f"{self.path}: expected one tensor ending in {suffix!r}, found {keys}")
        with safe_open(str(self._where[keys[0]]), framework="pt") as handle:
            return handle.get_tensor(keys[0])


def _teacher_weights(teacher):
    if isinstance(teacher, str | Path):
        return CheckpointWeights(teacher)
    return ModuleWeights(teacher)


def _arch(model_or_path) -> ArchInfo:
    if isinstance(model_or_path, str | Path):
        from transformers import AutoConfig

        return describe(AutoConfig.from_pretrained(model_or_path))
    return describe(model_or_path)


def _check_plan(
    inputs: AwarenessInputs,
    pairs,
    teacher: ArchInfo,
    student: ArchInfo,
    targets,
    ranks,
    fill_rule=RANKED,
    plan: InitPlan = PAPER_PLAN,
) -> None:
    """Gather every problem with the requested transfer into one error, before any work is done."""
    problems = [f"unknown pair {p!r} (awareness has {inputs.pairs})" for p in pairs if p not in inputs.pairs]
    problems += plan.problems()
    if not ranks:
        problems.append("r_gen and r_spe are both 0: no init to build")
    if fill_rule not in FILL_RULES:
        problems.append(f"unknown fill rule {fill_rule!r} (known: {', '.join(FILL_RULES)})")
    problems += [
        f"unknown target {t!r} (known: {', '.join(PROJECTIONS)})" for t in targets if t not in PROJECTIONS
    ]
    problems += [
        f"pair name {p!r} may not contain '.' or be {GENERAL!r}" for p in pairs if "." in p or p == GENERAL
    ]
    for name, rank in ranks.items():
        for t in (t for t in targets if t in PROJECTIONS):
            if not 1 <= rank <= min(student.projection_shape(t)):
                problems.append(
                    f"rank {rank} ({name}) not in [1, {min(student.projection_shape(t))}] for {t}"
                )
                break
    layers = inputs.selected_layers
    if len(layers) != student.num_layers:
        problems.append(
            f"awareness.json selects {len(layers)} teacher layers; the student has {student.num_layers}"
        )
    if layers != sorted(set(layers)) or any(not 0 <= x < teacher.num_layers for x in layers):
        problems.append(f"selected_layers {layers} must be distinct, sorted, in [0, {teacher.num_layers})")
    if problems:
        raise MlasLoraError("cannot transfer:\n  " + "\n  ".join(problems))


def _inits(inputs: AwarenessInputs, layer: int, proj: str, names: Sequence[str], plan: InitPlan) -> dict:
    """name -> {side: (scores, candidates)} for each init to build (GENERAL first, then pairs)."""
    sides = {side: inputs.side(layer, proj, side) for side in ("out", "in")}
    inits = {}
    for name in names:
        i = None if name == GENERAL else inputs.pairs.index(name)
        inits[name] = {
            s: init_ranking(plan, phi, cls, i, f"{layer}.{proj}.{s}.{name}")
            for s, (phi, cls) in sides.items()
        }
    return inits


def _one_projection(
    weight, inits, proj, teacher, student, ranks, device=None, fill_rule=RANKED
) -> tuple[dict, dict, dict]:
    """Eq. (4)-(5) then (7)-(8) for every init of one projection: (factors, indices, records).

    The general init comes first (`_inits`), so each pair's choice can be set against it.
    """
    factors, indices, records, general = {}, {}, {}, {}
    for name, sides in inits.items():
        chosen = choose_init(proj, sides, general, fill_rule, teacher, student)
        rows, cols = chosen["out"], chosen["in"]
        sub = extract_submatrix(weight, rows.indices.to(weight.device), cols.indices.to(weight.device))
        b, a, energy = svd_factors(sub if device is None else sub.to(device), ranks[name])
        factors[name], indices[name] = (b.cpu(), a.cpu()), (rows.indices, cols.indices)
        records[name] = {
            "shape": [rows.indices.numel(), cols.indices.numel()],
            "rank": ranks[name],
            "awareness": rows.score + cols.score,
            "awareness_rows": rows.score,
            "awareness_cols": cols.score,
            "filled_rows": rows.n_filled,
            "filled_cols": cols.n_filled,
            "head_rule_rows": rows.rule,
            "head_rule_cols": cols.rule,
            "energy_kept": energy,
        }
        if name == GENERAL:
            general = chosen
        elif general:
            records[name].update(overlap_record(chosen, general, sides, fill_rule))
    return factors, indices, records


def transfer_factors(
    teacher,
    student,
    awareness_dir: str | Path,
    classes_dir: str | Path,
    pairs: Sequence[str] | None,
    r_gen: int,
    r_spe: int,
    targets: Sequence[str] = PROJECTIONS,
    progress: bool = True,
    device: str | torch.device | None = None,
    fill_rule: str = RANKED,
    plan: InitPlan = PAPER_PLAN,
) -> Factors:
    """Eq. (4)-(8) for every selected layer: the general and per-pair LoRA inits of the student.

    teacher: a transformers model or a checkpoint directory (read lazily, layer by layer);
    student: a model, config or checkpoint directory (only its shapes are used); pairs: the
    pairs to build specific inits for (None: all pairs of awareness.json); device: where the SVDs
    run (None: where the teacher weight is; factors always come back on CPU); fill_rule: how a
    pair's too-small neuron set is filled (extract.FILL_RULES). The general ranking averages the
    awareness over all pairs of awareness.json, the set the classes were built on. A rank of 0 builds
    no such init (no general LoRA, or no per-pair LoRAs). plan: which layers and neurons (plan.py).
    """
    inputs = AwarenessInputs(awareness_dir, classes_dir)
    weights, s_info = _teacher_weights(teacher), _arch(student)
    pairs, targets = list(inputs.pairs if pairs is None else pairs), list(targets)
    ranks = {GENERAL: r_gen, **dict.fromkeys(pairs, r_spe)}
    ranks = {name: rank for name, rank in ranks.items() if rank}
    given = {k: v for k, v in {"r_gen": r_gen, "r_spe": r_spe}.items() if v}
    _check_plan(inputs, pairs, weights.info, s_info, targets, given, fill_rule, plan)
    out = Factors(meta=_meta(inputs, pairs, r_gen, r_spe, targets, weights.info, s_info))
    layers = choose_layers(plan, inputs.selected_layers, weights.info.num_layers)
    out.meta.update(fill_rule=fill_rule, plan=vars(plan), layer_map={str(s): t for s, t in enumerate(layers)})
    layer_map = list(enumerate(layers))
    for s_layer, t_layer in progress_bar(layer_map, desc="transfer", unit="layer", show=progress):
        for proj in targets:
            weight = weights.weight(t_layer, proj)
            if tuple(weight.shape) != weights.info.projection_shape(proj):
                raise MlasLoraError(
                    f"teacher layer {t_layer} {proj}: weight {tuple(weight.shape)} "
                    f"!= config shape {weights.info.projection_shape(proj)}"
                )
            inits = _inits(inputs, t_layer, proj, list(ranks), plan)
            factors, indices, records = _one_projection(
                weight, inits, proj, weights.info, s_info, ranks, device, fill_rule
            )
            out.tensors[(s_layer, proj)], out.indices[(s_layer, proj)] = factors, indices
            for name, record in records.items():
                out.meta["submatrices"][f"{s_layer}.{proj}.{name}"] = {"teacher_layer": t_layer, **record}
            del weight
    out.meta["overlap_with_general"] = overlap_summary(out.meta["submatrices"], pairs, targets)
    return out


def _meta(inputs, pairs, r_gen, r_spe, targets, t_info: ArchInfo, s_info: ArchInfo) -> dict:
    return {
        "format": FORMAT,
        "pairs": pairs,
        "awareness_pairs": inputs.pairs,
        "ranks": {"general": r_gen, "specific": r_spe},
        "targets": targets,
        "layer_map": {str(s): t for s, t in enumerate(inputs.selected_layers)},
        "teacher": vars(t_info).copy(),
        "student": vars(s_info).copy(),
        "submatrices": {},
    }


def save_factors(factors: Factors, out_dir: str | Path) -> Path:
    """Write factors.safetensors, indices.safetensors and transfer.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, indices = {}, {}
    for (layer, proj), inits in factors.tensors.items():
        for name, (b, a) in inits.items():
            tensors[f"{layer}.{proj}.{name}.B"] = b.contiguous()
            tensors[f"{layer}.{proj}.{name}.A"] = a.contiguous()
    for (layer, proj), inits in factors.indices.items():
        for name, (rows, cols) in inits.items():
            indices[f"{layer}.{proj}.{name}.rows"] = rows.contiguous()
            indices[f"{layer}.{proj}.{name}.cols"] = cols.contiguous()
    save_file(tensors, str(out_dir / "factors.safetensors"), metadata={"format": FORMAT})
    save_file(indices, str(out_dir / "indices.safetensors"), metadata={"format": FORMAT})
    write_text_atomic(out_dir / "transfer.json", json.dumps(factors.meta, indent=2) + "\n")
    return out_dir


def _group(path: Path, suffixes: tuple[str, str]) -> dict:
    """Read `{l}.{p}.{name}.{suffix}` tensors into {(l, p): {name: (first, second)}}."""
    grouped: dict = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            parts = key.split(".")
            if len(parts) != 4 or not parts[0].isdigit() or parts[3] not in suffixes:
                raise MlasLoraError(
                    f"{path}: unexpected key {key!r} (expected l.proj.name.{'|'.join(suffixes)})"
                )
            layer, proj, name, part = int(parts[0]), parts[1], parts[2], parts[3]
            grouped.setdefault((layer, proj), {}).setdefault(name, {})[part] = handle.get_tensor(key)
    out = {}
    for key, names in grouped.items():
        for name, parts in names.items():
            if set(parts) != set(suffixes):
                raise MlasLoraError(f"{path}: {key[0]}.{key[1]}.{name} lacks one of {suffixes}")
            out.setdefault(key, {})[name] = (parts[suffixes[0]], parts[suffixes[1]])
    return out


def load_factors(out_dir: str | Path) -> Factors:
    """Read what save_factors wrote (indices.safetensors is optional)."""
    out_dir = Path(out_dir)
    meta = read_json(out_dir / "transfer.json", "transfer")
    if meta.get("format") != FORMAT:
        raise MlasLoraError(f"{out_dir}/transfer.json: format {meta.get('format')!r}, expected {FORMAT!r}")
    factors_path, indices_path = out_dir / "factors.safetensors", out_dir / "indices.safetensors"
    if not factors_path.is_file():
        raise MlasLoraError(f"missing {factors_path}; run the transfer stage first")
    indices = _group(indices_path, ("rows", "cols")) if indices_path.is_file() else {}
    tensors = _group(factors_path, ("B", "A"))
    return Factors(tensors=_in_meta_order(tensors, meta), indices=_in_meta_order(indices, meta), meta=meta)


def _in_meta_order(grouped: dict, meta: dict) -> dict:
    """Layers ascending, projections and names in the order transfer.json lists them (safetensors sorts keys)."""
    projs = {p: i for i, p in enumerate(meta.get("targets", PROJECTIONS))}
    names = {n: i for i, n in enumerate([GENERAL, *meta.get("pairs", [])])}
    keys = sorted(grouped, key=lambda k: (k[0], projs.get(k[1], len(projs)), k[1]))
    return {
        k: dict(sorted(grouped[k].items(), key=lambda kv: (names.get(kv[0], len(names)), kv[0])))
        for k in keys
    }


def run_transfer(
    teacher,
    student,
    awareness_dir,
    classes_dir,
    out_dir,
    pairs,
    r_gen,
    r_spe,
    targets=PROJECTIONS,
    progress: bool = True,
    device=None,
    fill_rule: str = RANKED,
    plan: InitPlan = PAPER_PLAN,
) -> Factors:
    """transfer_factors then save_factors: the stage's entry point."""
    factors = transfer_factors(
        teacher,
        student,
        awareness_dir,
        classes_dir,
        pairs,
        r_gen,
        r_spe,
        targets,
        progress,
        device,
        fill_rule,
        plan,
    )
    save_factors(factors, out_dir)
    return factors
