"""Teacher translations as training targets (beyond the paper: sequence-level distillation, Kim and
Rush 2016; an LLM teacher's translations as fine-tuning data, Finkelstein et al. ICLR 2024).

    distill-<key>/   targets.jsonl  one row per segment: {id, pair, source, target}, in request order
                     stage.json     the key and the seconds the teacher took

The teacher translates exactly the training sources a system will read (`rows_read`: the trainer's
seeded order up to its last micro-batch; every row when it reads them all), greedy, with the prompt
and the decoder the evaluation uses (`translate` on `zero_shot_requests`). The key holds what the
translations depend on: the teacher, its dtype, the prompt and decoding settings and the sources
with their ids (`PAIR/INDEX` in the training split, `PAIR/mono/LINE` in a monolingual file), so a
change of any of them translates again and nothing else does. The filter (`data.teacher_filter`)
runs after the stage, on its stored outputs; `train-<system>/targets.json` counts what it dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mlas_lora.data.records import Example
from mlas_lora.distributed import is_main_process, main_process_first
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig, TeacherFilter
from mlas_lora.experiments.stages import mark_done, stage_done, stage_folder, stage_key
from mlas_lora.stage_files import fresh_dir, json_line, json_lines, write_text_atomic
from mlas_lora.training.config import TrainingConfig


@dataclass(frozen=True)
class Row:
    """One training row: its source id, its example, and whether it is monolingual (no reference)."""

    id: str
    example: Example
    monolingual: bool = False


def rows_read(pair_indices: list[int], training: TrainingConfig) -> list[int]:
    """The indices of the training rows the trainer reads, ascending: the rows of its first
    max_steps x grad_accum micro-batches in the seeded order (`epoch_batches`), which depends on the
    number of rows and their pairs only. Every row when that is at least one epoch."""
    from mlas_lora.training.data import Feature, epoch_batches
    from mlas_lora.training.trainer import total_steps

    features = [Feature([], [], p) for p in pair_indices]
    first_epoch = epoch_batches(features, training.micro_batch, training.seed, 0, training.mixed_pairs)
    micro = total_steps(len(first_epoch), training) * training.grad_accum
    if micro >= len(first_epoch):
        return list(range(len(features)))
    return sorted(i for batch in first_epoch[:micro] for i in batch)


def read_monolingual(path: str | Path, direction: str) -> list[Row]:
    """One source sentence a line (UTF-8); a blank line, a tab (a TSV of pairs is a corpus, not
    monolingual text) or an empty file is an error naming the file and the line."""
    from mlas_lora.data.lines import read_lines

    path = Path(path)
    if not path.is_file():
        raise MlasLoraError(f"data.monolingual.{direction}: no file {path}")
    src, tgt = direction.split("-")
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            raise MlasLoraError(f"{path}:{number}: an empty line (one source sentence a line; remove it)")
        if "\t" in line:
            raise MlasLoraError(
                f"{path}:{number}: a tab: data.monolingual takes one source sentence a line, not pairs "
                "(a TSV of pairs belongs in data.corpus)"
            )
        rows.append(Row(f"{direction}/mono/{number}", Example(src, tgt, line.strip(), ""), monolingual=True))
    if not rows:
        raise MlasLoraError(f"{path}: no sentence (data.monolingual.{direction})")
    return rows


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def teacher_generation(config: ExperimentConfig):
    """The evaluation's decoding settings, greedy (the teacher's targets are its 0-shot translations)."""
    return replace(config.generation, num_beams=1)


def translation_settings(config: ExperimentConfig) -> dict:
    """What a teacher translation depends on besides its source: teacher, dtype, prompt, decoding."""
    from mlas_lora.models.loading import key_dtype
    from mlas_lora.translation.generate import GREEDY_DECODER

    generation = asdict(teacher_generation(config))
    generation.pop("precision")  # changes no untrained model
    return {
        "teacher": config.models.teacher,
        "dtype": key_dtype(config.models.dtype),
        "generation": {**generation, "decoder": GREEDY_DECODER},
    }


def key_parts(config: ExperimentConfig) -> dict:
    """What a training's key adds when the teacher acts on it (nothing otherwise: earlier keys stay):
    the translation settings and the monolingual files' contents (teacher targets), the teacher
    whose bf16 logits are distilled (training.distill)."""
    parts: dict = {}
    if config.data.teacher_targets:
        mono = {d: file_digest(p) for d, p in sorted(config.data.monolingual.items()) if Path(p).is_file()}
        parts["teacher_targets"] = {**translation_settings(config), **({"monolingual": mono} if mono else {})}
    if config.training.distill.enabled:
        parts["distill_teacher"] = {"teacher": config.models.teacher, "dtype": distill_teacher_dtype()}
    return parts


def distill_key(config: ExperimentConfig, rows: list[Row]) -> str:
    sources = hashlib.sha256(
        json.dumps([[r.id, r.example.pair, r.example.source] for r in rows], ensure_ascii=False).encode()
    ).hexdigest()
    return stage_key(**translation_settings(config), prompt=PROMPT_VERSION, sources=sources)


PROMPT_VERSION = 1
"""The prompt of `mlas_lora.prompting`; raise it when that prompt changes (older stages then translate again)."""


def teacher_prompt_problem(tokenizer, config: ExperimentConfig) -> str | None:
    """Why the teacher cannot translate with the student's prompt, or None."""
    if config.generation.chat is not False and getattr(tokenizer, "chat_template", None) is None:
        return (
            f"the teacher {config.models.teacher!r} has no chat template, so it cannot translate with the "
            "prompt the student is trained and evaluated with (a chat turn); use an instruct teacher, or "
            "generation.chat=false for the plain-text prompt"
        )
    return None


def teacher_translations(
    config: ExperimentConfig, rows: list[Row], run_dir: Path
) -> tuple[dict[str, str], Path]:
    """({row id: the teacher's translation}, the stage folder): the stage's stored targets, made first if
    need be (by the main process; the others wait and read them)."""
    from mlas_lora.languages import Direction

    key = distill_key(config, rows)
    folder = stage_folder(run_dir, "distill", key)
    with main_process_first():
        if not stage_done(folder, key) and is_main_process():
            for pair in dict.fromkeys(r.example.pair for r in rows):
                try:
                    Direction.parse(pair)
                except MlasLoraError as err:
                    raise MlasLoraError(f"the teacher cannot translate {pair}: {err}") from None
            _translate_rows(config, rows, folder, key)
    stored = json_lines((folder / "targets.jsonl").read_text(encoding="utf-8"))
    return {row["id"]: row["target"] for row in stored}, folder


def _translate_rows(config: ExperimentConfig, rows: list[Row], folder: Path, key: str) -> None:
    from mlas_lora.models.loading import load_model
    from mlas_lora.translation.baselines import zero_shot_requests
    from mlas_lora.translation.generate import translate

    start = time.perf_counter()
    teacher, tokenizer = load_model(config.models.teacher, dtype=config.models.dtype)
    if problem := teacher_prompt_problem(tokenizer, config):
        raise MlasLoraError(problem)
    requests = zero_shot_requests([r.example for r in rows])
    targets = translate(teacher, tokenizer, requests, teacher_generation(config), desc="teacher targets")
    fresh_dir(folder)
    lines = [
        json_line({"id": r.id, "pair": r.example.pair, "source": r.example.source, "target": t})
        for r, t in zip(rows, targets, strict=True)
    ]
    write_text_atomic(folder / "targets.jsonl", "".join(line + "\n" for line in lines))
    mark_done(folder, key, time.perf_counter() - start)


def drop_reason(source: str, target: str, rule: TeacherFilter | None) -> str | None:
    """Why `data.teacher_filter` drops a teacher translation ('empty', 'copy', 'length_ratio'), or None."""
    if rule is None:
        return None
    if not target.strip():
        return "empty" if rule.empty else None
    if rule.copy and " ".join(target.split()).casefold() == " ".join(source.split()).casefold():
        return "copy"
    low, high = rule.length_ratio
    if not low <= len(target) / max(1, len(source)) <= high:
        return "length_ratio"
    return None


def training_examples(
    config: ExperimentConfig, training: TrainingConfig, train: dict[str, list[Example]], run_dir: Path
) -> tuple[list[Example], dict | None]:
    """The rows a system trains on, in the trainer's order (pair by pair: the split's rows, then the
    pair's monolingual ones), with the teacher's targets where `data` asks for them; and what was
    done (None when the teacher acts on nothing: the split's rows exactly as before)."""
    data = config.data
    parallel = {pair: [Row(f"{pair}/{i}", e) for i, e in enumerate(rows)] for pair, rows in train.items()}
    if not data.teacher_targets:
        return [r.example for rows in parallel.values() for r in rows], None
    mono = {pair: read_monolingual(path, pair) for pair, path in data.monolingual.items()}
    lines = {pair: len(rows) for pair, rows in mono.items()}
    targets: dict[str, str] = {}
    folders: list[Path] = []
    dropped: dict[str, int] = {}
    if mono and data.teacher_filter is not None:  # the filter decides how many rows there are
        got, folder = teacher_translations(config, [r for rows in mono.values() for r in rows], run_dir)
        targets.update(got)
        folders.append(folder)
        mono = {
            pair: [r for r in rows if not _dropped(r, got[r.id], data.teacher_filter, dropped)]
            for pair, rows in mono.items()
        }
    rows = [r for pair, own in parallel.items() for r in (*own, *mono.get(pair, ()))]
    pairs = list(train)
    read = rows_read([pairs.index(r.example.pair) for r in rows], training)
    wanted = teacher_rows(rows, read, config, training)
    todo = [rows[i] for i in wanted if rows[i].id not in targets]
    if todo:
        got, folder = teacher_translations(config, todo, run_dir)
        targets.update(got)
        folders.append(folder)
    examples = [r.example for r in rows]
    used = 0
    for i in wanted:
        row = rows[i]
        if row.monolingual or not _dropped(row, targets[row.id], data.teacher_filter, dropped):
            examples[i] = replace(row.example, reference=targets[row.id])
            used += 1
    summary = {
        "targets": data.targets,
        "teacher": config.models.teacher,
        "rows": len(rows),
        "rows_read": len(read),
        "teacher_targets": used,
        "dropped": dropped,
        "monolingual": {pair: {"lines": n, "kept": len(mono[pair])} for pair, n in lines.items()},
        "stages": [f.name for f in folders],
        "teacher_seconds": round(sum(_stage_seconds(f) for f in folders), 1),
    }
    return examples, summary


def teacher_rows(
    rows: list[Row], read: list[int], config: ExperimentConfig, training: TrainingConfig
) -> list[int]:
    """The read rows whose target is the teacher's, ascending: every monolingual one, and of the split's
    rows all ('teacher'), none ('reference') or a seeded `teacher_share` of them ('mixed')."""
    data = config.data
    split_rows = [i for i in read if not rows[i].monolingual]
    if data.targets == "reference":
        split_rows = []
    elif data.targets == "mixed":
        rng = random.Random(f"teacher-share/{data.seed}/{training.seed}")
        shuffled = rng.sample(split_rows, len(split_rows))
        split_rows = shuffled[: round(data.teacher_share * len(split_rows))]
    return sorted({*split_rows, *(i for i in read if rows[i].monolingual)})


def _dropped(row: Row, target: str, rule: TeacherFilter | None, counts: dict[str, int]) -> bool:
    reason = drop_reason(row.example.source, target, rule)
    if reason is not None:
        counts[reason] = counts.get(reason, 0) + 1
    return reason is not None


def _stage_seconds(folder: Path) -> float:
    marker = folder / "stage.json"
    return json.loads(marker.read_text()).get("seconds", 0.0) if marker.is_file() else 0.0


def distill_teacher_dtype() -> str:
    """The dtype of the teacher whose logits are distilled: bfloat16 where it runs fast (a GPU, a CPU
    with native bfloat16), else float32 (emulated bfloat16 on such a CPU is several times slower)."""
    from mlas_lora.models.loading import key_dtype

    return "bfloat16" if key_dtype("auto") == "auto" else "float32"


def distill_teacher(config: ExperimentConfig):
    """The teacher whose logits `training.distill` distils: loaded once per training, in
    `distill_teacher_dtype()`."""
    from mlas_lora.models.loading import load_model

    return load_model(config.models.teacher, dtype=distill_teacher_dtype())[0]


def distill_problems(systems) -> list[str]:
    """What rules out a system's distillation before any stage runs: token-level distillation from
    a teacher whose tokenizer or output layer differs from the student's (the vocab sizes named), a
    teacher without the student's chat prompt, an unreadable monolingual file. A model that cannot
    be read here (not prepared yet, offline) is left to the stage that loads it."""
    tokenizers: dict[str, object] = {}
    out = []
    for system in systems:
        config = system.config
        if not system.method.trains:
            continue
        if config.training.distill.enabled:
            problem = vocabulary_problem(config, tokenizers)
            out += [f"system {system.name!r}: {problem}"] if problem else []
        if config.data.teacher_targets:
            teacher = _tokenizer(config.models.teacher, tokenizers)
            problem = teacher_prompt_problem(teacher, config) if teacher is not None else None
            out += [f"system {system.name!r}: data.targets: {problem}"] if problem else []
            for pair, path in config.data.monolingual.items():
                try:
                    read_monolingual(path, pair)
                except MlasLoraError as err:
                    out.append(f"system {system.name!r}: {err}")
    return list(dict.fromkeys(out))


def vocabulary_problem(config: ExperimentConfig, tokenizers: dict | None = None) -> str | None:
    """Why the teacher's logits cannot be compared with the student's token by token, or None."""
    from mlas_lora.models.loading import load_model_config, resolve_source

    cache = {} if tokenizers is None else tokenizers
    names = (config.models.teacher, config.models.student)
    teacher, student = (_tokenizer(n, cache) for n in names)
    if teacher is None or student is None:
        return None
    if teacher.get_vocab() != student.get_vocab():
        return (
            f"training.distill needs the teacher and the student to share one tokenizer: the teacher "
            f"{names[0]!r} has a vocabulary of {len(teacher)} tokens, the student {names[1]!r} "
            f"{len(student)}{' (different ones)' if len(teacher) == len(student) else ''}"
        )
    try:
        widths = [load_model_config(*resolve_source(n)).vocab_size for n in names]
    except Exception:  # noqa: BLE001 - reported by the stage that loads the model
        return None
    if widths[0] != widths[1]:
        return (
            f"training.distill needs logits of one width: the teacher {names[0]!r} outputs {widths[0]} "
            f"(vocab size), the student {names[1]!r} {widths[1]}"
        )
    return None


def _tokenizer(name: str, cache: dict):
    from mlas_lora.models.loading import load_tokenizer, resolve_source

    if name not in cache:
        try:
            cache[name] = load_tokenizer(*resolve_source(name))
        except Exception:  # noqa: BLE001 - reported by the stage that loads the model
            cache[name] = None
    return cache[name]


def targets_report(folders: dict[str, Path]) -> str:
    """A report section: per system that learnt from the teacher's translations ({name: its training
    folder}), how many of the rows it read had them, what the filter dropped and the teacher's seconds
    (train-<system>/targets.json)."""
    from mlas_lora.stage_files import read_small_json

    lines = []
    for name, folder in folders.items():
        done = read_small_json(folder / "targets.json")
        if not isinstance(done, dict):
            continue
        drops = ", ".join(f"{k} {v}" for k, v in sorted(done["dropped"].items())) or "none"
        mono = ", ".join(f"{p} {m['kept']}/{m['lines']}" for p, m in done["monolingual"].items()) or "-"
        lines.append(
            f"| {name} | {done['targets']} | {done['rows_read']} of {done['rows']} | "
            f"{done['teacher_targets']} | {drops} | {mono} | {done['teacher_seconds']:.1f} |"
        )
    if not lines:
        return ""
    head = [
        "## Teacher translations as targets\n",
        "| System | targets | rows read | teacher targets | dropped by the filter | monolingual kept/lines "
        "| teacher (s) |",
        "| --- | --- | ---: | ---: | --- | --- | ---: |",
    ]
    return "\n".join(head + lines) + "\n"
