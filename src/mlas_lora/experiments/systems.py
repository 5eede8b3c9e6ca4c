"""The systems of a config, resolved: a name, its method, and the config with its own changes applied.

`systems: [lora, Mr-spe, {name: mlas-r4, method: mlas-lora, lora: {r_spe: 4}}]`: a string is a preset
(methods/presets.py) or a method name; a mapping names the system and gives a `method` or a `preset`
to start from, then the sections it changes. Every problem of every system is reported at once,
before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlas_lora.config import config_from_dict, merge_trees, to_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import DataConfig, ExperimentConfig
from mlas_lora.methods import METHODS, Method
from mlas_lora.methods.presets import PRESETS

SECTIONS = ("lora", "training", "awareness", "transfer", "generation", "options", "data")
"""The config sections a system may change; models, evaluation and data are the experiment's, but for
the training targets (`DataConfig.TARGET_FIELDS`: a system may learn from the teacher's translations)."""


@dataclass(frozen=True)
class System:
    name: str
    method: Method
    config: ExperimentConfig
    spec: dict
    """The system as resolved from its preset: method and changed sections (for the report)."""


def system_spec(entry) -> tuple[str, dict]:
    """(name, {method, sections...}) of one `systems:` entry; raises on a malformed one."""
    if isinstance(entry, str):
        if entry in PRESETS:
            return entry, dict(PRESETS[entry])
        if entry in METHODS:
            return entry, {"method": entry}
        known = sorted(set(PRESETS) | set(METHODS))
        raise MlasLoraError(f"unknown system {entry!r} (presets and methods: {', '.join(known)})")
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise MlasLoraError(f"a system must be a name or a mapping with a `name`, got {entry!r}")
    spec = {k: v for k, v in entry.items() if k not in ("name", "preset")}
    if "preset" in entry:
        if entry["preset"] not in PRESETS:
            raise MlasLoraError(f"system {entry['name']!r}: unknown preset {entry['preset']!r}")
        spec = merge_trees(PRESETS[entry["preset"]], spec)
    unknown = [k for k in spec if k not in ("method", *SECTIONS)]
    if unknown:
        raise MlasLoraError(
            f"system {entry['name']!r}: unknown keys {unknown} (known: name, method, preset, {', '.join(SECTIONS)})"
        )
    if fixed := sorted(set(spec.get("data") or {}) - set(DataConfig.TARGET_FIELDS)):
        raise MlasLoraError(
            f"system {entry['name']!r}: data.{', data.'.join(fixed)} is the experiment's; a system may set "
            f"data.{', data.'.join(DataConfig.TARGET_FIELDS)} only"
        )
    if spec.get("method") not in METHODS:
        raise MlasLoraError(
            f"system {entry['name']!r}: method {spec.get('method')!r} (known: {', '.join(METHODS)})"
        )
    return entry["name"], spec


def resolve_system(entry, config: ExperimentConfig) -> System:
    name, spec = system_spec(entry)
    tree = to_dict(config)
    for section in SECTIONS:
        if section in spec:
            tree[section] = merge_trees(tree[section], spec[section])
    try:
        effective = config_from_dict(ExperimentConfig, tree)
    except MlasLoraError as err:
        raise MlasLoraError(f"system {name!r}: {err}") from None
    method = METHODS[spec["method"]]
    if problems := method.problems(effective):
        raise MlasLoraError(f"system {name!r}: " + "; ".join(problems))
    return System(name, method, effective, spec)


def resolve_systems(config: ExperimentConfig) -> list[System]:
    """Every system of the config; one error listing every problem (and duplicate names)."""
    systems, problems = [], []
    for entry in config.systems:
        try:
            systems.append(resolve_system(entry, config))
        except MlasLoraError as err:
            problems.append(str(err))
    names = [s.name for s in systems]
    problems += [f"system name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"system name {n!r} may not contain '/'" for n in names if "/" in n]
    problems += [f"system name {n!r} is a folder's own name ('.' or '..')" for n in names if n in (".", "..")]
    baseline = config.evaluation.significance_baseline(names)
    complete = len(systems) == len(config.systems)
    if complete and baseline is not None and any(s.method.trains for s in systems) and baseline not in names:
        problems.append(
            f"evaluation.baseline_for_significance: {baseline!r} is not a system of this config "
            f"(systems: {', '.join(names)})"
        )
    problems += model_problems(config, systems)
    if not problems:
        from mlas_lora.experiments.distill import distill_problems

        problems += distill_problems(systems)
    if problems:
        raise MlasLoraError("invalid systems:\n  - " + "\n  - ".join(problems))
    return systems


def find_system(systems: list[System], name: str) -> System:
    for system in systems:
        if system.name == name:
            return system
    raise MlasLoraError(f"no system {name!r} in this config (systems: {', '.join(s.name for s in systems)})")


def _arch(name: str):
    """The architecture of a model from its config alone, or None where it cannot be read here
    (an embedded model not prepared yet, a hub id offline): its stage then says what to do."""
    from mlas_lora.models.arch import describe
    from mlas_lora.models.loading import load_model_config, resolve_source

    try:
        return describe(load_model_config(*resolve_source(name)))
    except Exception:  # noqa: BLE001 - any failure here is reported by the stage that loads the model
        return None


def model_problems(config: ExperimentConfig, systems: list[System]) -> list[str]:
    """What the two model configs (read without weights) rule out, before any stage runs."""
    from mlas_lora.models.arch import PROJECTIONS

    student = _arch(config.models.student)
    if student is None:
        return []
    out = []
    smallest = min(min(student.projection_shape(p)) for p in PROJECTIONS)
    for system in systems:
        lora = system.config.lora
        if system.method.trains and lora.r_gen + lora.r_spe > smallest:
            out.append(
                f"system {system.name!r}: rank r_gen + r_spe = {lora.r_gen + lora.r_spe} exceeds the "
                f"student's smallest projection dimension {smallest}"
            )
    if not any(s.method.trains and s.method.needs_transfer(s.config) for s in systems):
        return out
    teacher = _arch(config.models.teacher)
    if teacher is None:
        return out
    if teacher.num_layers < student.num_layers:
        out.append(
            f"models: the teacher has {teacher.num_layers} layers, fewer than the student's "
            f"{student.num_layers}; Eq. (1) keeps as many teacher layers as the student has"
        )
    narrower = [
        p for p in PROJECTIONS
        if any(t < s for t, s in zip(teacher.projection_shape(p), student.projection_shape(p), strict=True))
    ]  # fmt: skip
    if narrower:
        out.append(
            f"models: the teacher's {', '.join(narrower)} projections are smaller than the student's; "
            "Eq. (4)-(5) cut student-shaped submatrices out of the teacher"
        )
    return out
