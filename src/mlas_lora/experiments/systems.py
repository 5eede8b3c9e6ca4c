"""The systems of a config, resolved: a name, its method, and the config with its own changes applied.

`systems: [lora, Mr-spe, {name: mlas-r4, method: mlas-lora, lora: {r_spe: 4}}]`: a string is a preset
(methods/presets.py) or a method name; a mapping names the system and gives a `method` or a `preset`
to start from, then the sections it changes. Every problem of every system is reported at once,
before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlas_lora.config import config_from_dict, merge_trees, to_dict
from mlas_lora.errors import MlasLoraError, config_error
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


OPENED = ("models", "teacher", "comet")
"""What a command opens before its first stage (`resolve_systems`' open_models): `models`, the models
its systems translate with or learn from; `teacher`, the teacher and the student for the teacher
stages whatever the systems; `comet`, evaluation.comet_model where the metrics ask for COMET."""


def resolve_systems(config: ExperimentConfig, open_models: tuple[str, ...] = ()) -> list[System]:
    """Every system of the config; one error listing every problem (and duplicate names).

    `open_models` (of OPENED) names what the command will load: each is opened now, config only, and
    one that does not open, or whose architecture is not supported, is a problem naming its key, so a
    mistyped teacher path stops a run before its first stage instead of after the student's training.
    Without it (checking a config alone) a model that cannot be read here is left out of the checks."""
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
    problems += model_problems(config, systems, open_models)
    if not problems:
        from mlas_lora.experiments.distill import distill_problems

        problems += distill_problems(systems)
    if problems:
        raise config_error(problems)
    return systems


def find_system(systems: list[System], name: str) -> System:
    for system in systems:
        if system.name == name:
            return system
    raise MlasLoraError(f"no system {name!r} in this config (systems: {', '.join(s.name for s in systems)})")


def system_models(system: System) -> set[str]:
    """The `models.*` keys a system loads: the model a prompting system translates with; the student
    of a trained one, and the teacher where its init, distillation or targets come from it, and those
    of the system it trains on top of (its prerequisite)."""
    config = system.config
    if not system.method.trains:
        name = system.method.model(config)
        return {role for role in ("student", "teacher") if getattr(config.models, role) == name}
    roles = {"student"}
    if system.method.needs_transfer(config) or config.training.distill.enabled or config.data.teacher_targets:
        roles.add("teacher")
    if (prior := system.method.prerequisite(config)) is not None:
        roles |= system_models(resolve_system(prior, config))
    return roles


def _open(config: ExperimentConfig, role: str, opened: dict, problems: list[str] | None) -> None:
    """Read `models.<role>`'s architecture into `opened`; a failure is a problem where `problems` is
    given, else left to the stage that loads the model (an embedded model not prepared yet)."""
    from mlas_lora.models.loading import model_arch

    name = getattr(config.models, role)
    try:
        opened[role] = model_arch(name)
    except Exception as err:  # noqa: BLE001 - every reason a model does not open is the user's to fix
        if problems is not None:
            reason = str(err) if isinstance(err, MlasLoraError) else f"{name!r}: {type(err).__name__}: {err}"
            problems.append(f"models.{role}: {reason}")


def model_problems(
    config: ExperimentConfig, systems: list[System], open_models: tuple[str, ...] = ()
) -> list[str]:
    """What the model configs (read without weights) rule out before any stage runs; `open_models` as
    in `resolve_systems`."""
    from mlas_lora.models.arch import PROJECTIONS

    if unknown := sorted(set(open_models) - set(OPENED)):
        raise ValueError(f"open_models: unknown {unknown} (known: {OPENED})")
    required = set().union(*map(system_models, systems)) if "models" in open_models else set()
    required |= {"student", "teacher"} if "teacher" in open_models else set()
    transfer = any(s.method.trains and s.method.needs_transfer(s.config) for s in systems)
    opened, out = {}, []
    for role in ("student", "teacher"):
        if role in required or role == "student" or transfer:
            _open(config, role, opened, out if role in required else None)
    out += comet_problems(config) if "comet" in open_models else []
    student, teacher = opened.get("student"), opened.get("teacher")
    if student is None:
        return out
    smallest = min(min(student.projection_shape(p)) for p in PROJECTIONS)
    for system in systems:
        lora = system.config.lora
        if system.method.trains and lora.r_gen + lora.r_spe > smallest:
            out.append(
                f"system {system.name!r}: rank r_gen + r_spe = {lora.r_gen + lora.r_spe} exceeds the "
                f"student's smallest projection dimension {smallest}"
            )
    if not transfer or teacher is None:
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


def comet_problems(config: ExperimentConfig) -> list[str]:
    """Why the COMET the metrics ask for cannot run (no checkpoint there, no unbabel-comet), or none."""
    from mlas_lora.evaluation.comet import comet_available

    evaluation = config.evaluation
    if "comet" not in evaluation.metrics or evaluation.comet_model is None:  # None: a config problem
        return []
    ok, reason = comet_available(evaluation.comet_model)
    return [] if ok else [f"evaluation.comet_model: {reason}"]
