"""Teacher translations as training targets (experiments/distill.py) on tiny models: the stage
translates exactly the rows the trainer reads, is keyed by teacher, prompt and sources only, filters
and counts; monolingual files, mismatched tokenizers and teachers without the prompt are refused."""

import json
from dataclasses import replace

import pytest

from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import TeacherFilter
from mlas_lora.experiments.data import load_splits
from mlas_lora.experiments.distill import (
    drop_reason,
    read_monolingual,
    rows_read,
    training_examples,
)
from mlas_lora.experiments.systems import resolve_system, resolve_systems
from test_pipeline import tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("distill")
    config = tiny_config(root)
    return root, config, load_splits(config.data, ("train", "dev"))


def with_data(config, **data):
    return replace(config, data=replace(config.data, **data))


def trainer_reads(examples, pairs, training, out_dir) -> list[int]:
    """The example indices the Trainer's micro-batches hold over its steps (identity of features)."""
    from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
    from mlas_lora.training.trainer import Trainer

    model = tiny_model()
    model.lm_head.weight.requires_grad_(True)
    trainer = Trainer(
        model, tiny_tokenizer(), examples, pairs, training, out_dir, None, lambda p: None, lambda p: None
    )
    position = {id(f): i for i, f in enumerate(trainer.features)}
    seen = {
        position[id(f)]
        for step in range(trainer.steps)
        for batch in trainer._step_micro_batches(step)
        for f in batch
    }
    return sorted(seen)


def test_the_teacher_translates_exactly_the_rows_the_trainer_reads(tiny, tmp_path):
    from mlas_lora.models.loading import load_model
    from mlas_lora.translation.baselines import zero_shot_requests
    from mlas_lora.translation.generate import translate

    root, config, splits = tiny
    seqkd = with_data(config, targets="teacher")
    flat = [e for rows in splits.train.values() for e in rows]
    pairs = list(splits.train)
    read = rows_read([pairs.index(e.pair) for e in flat], seqkd.training)
    assert 0 < len(read) < len(flat)  # 2 steps x 4 x 2 of 24 rows
    assert read == trainer_reads(flat, pairs, seqkd.training, tmp_path / "reads")
    examples, summary = training_examples(seqkd, seqkd.training, splits.train, root / "run")
    teacher, tokenizer = load_model(config.models.teacher, dtype=config.models.dtype)
    expected = translate(
        teacher, tokenizer, zero_shot_requests([flat[i] for i in read]), config.generation, progress=False
    )
    assert [examples[i].reference for i in read] == expected
    assert [examples[i] for i in range(len(flat)) if i not in read] == [
        flat[i] for i in range(len(flat)) if i not in read
    ]
    assert [(e.source, e.pair) for e in examples] == [(e.source, e.pair) for e in flat]
    (folder,) = (root / "run").glob("distill-*")
    stored = [json.loads(line) for line in (folder / "targets.jsonl").read_text().splitlines()]
    assert [row["id"] for row in stored] == [
        f"{flat[i].pair}/{splits.train[flat[i].pair].index(flat[i])}" for i in read
    ]
    assert [row["target"] for row in stored] == expected
    assert (
        summary["rows_read"] == len(read)
        and summary["teacher_targets"] == len(read)
        and summary["dropped"] == {}
    )
    assert summary["stages"] == [folder.name]


def test_the_stage_is_keyed_by_teacher_prompt_and_sources_only(tiny):
    from test_pipeline import save_tiny

    root, config, splits = tiny
    run = root / "keys"
    seqkd = with_data(config, targets="teacher")

    def stage_of(c):
        return training_examples(c, c.training, splits.train, run)[1]["stages"][-1]

    first = stage_of(seqkd)
    stamp = (run / first / "targets.jsonl").stat().st_mtime_ns
    assert stage_of(replace(seqkd, training=replace(seqkd.training, lr=0.5))) == first  # not re-translated
    assert stage_of(replace(seqkd, evaluation=replace(seqkd.evaluation, bootstrap_samples=3))) == first
    assert (run / first / "targets.jsonl").stat().st_mtime_ns == stamp
    other = save_tiny(root / "teacher-2", role="teacher", seed=7)
    changes = [
        replace(seqkd, models=replace(seqkd.models, teacher=str(other))),  # the teacher
        replace(seqkd, generation=replace(seqkd.generation, chat=False)),  # the prompt
        replace(seqkd, training=replace(seqkd.training, max_steps=1)),  # the sources read
    ]
    assert len({first, *(stage_of(c) for c in changes)}) == 4


def test_mixed_targets_take_a_seeded_share_of_the_rows_read(tiny):
    root, config, splits = tiny
    mixed = with_data(config, targets="mixed", teacher_share=0.25)
    examples, summary = training_examples(mixed, mixed.training, splits.train, root / "run")
    flat = [e for rows in splits.train.values() for e in rows]
    changed = [i for i, (a, b) in enumerate(zip(examples, flat, strict=True)) if a != b]
    assert summary["teacher_targets"] == round(0.25 * summary["rows_read"]) == 4
    assert len(changed) <= 4  # a teacher translation may equal the reference
    again, _ = training_examples(mixed, mixed.training, splits.train, root / "run")
    assert again == examples


def test_the_filter_drops_and_counts(tiny, tmp_path, monkeypatch):
    """Teacher outputs chosen by hand: a dropped one leaves the row's reference; a dropped monolingual
    row goes; the counts are recorded."""
    import mlas_lora.experiments.distill as distill

    root, config, splits = tiny
    mono = tmp_path / "mono.txt"
    mono.write_text("open the file\nsave the page\nprint\n")

    def fake(config, rows, run_dir):
        made = {}
        for n, row in enumerate(rows):
            made[row.id] = ["", row.example.source.upper(), "x" * 400, "ok translation"][n % 4]
        return made, tmp_path / f"distill-{len(rows)}"

    monkeypatch.setattr(distill, "teacher_translations", fake)
    rule = TeacherFilter(length_ratio=[0.2, 5.0])
    seqkd = with_data(config, targets="teacher", teacher_filter=rule, monolingual={"en-de": str(mono)})
    examples, summary = training_examples(
        seqkd, replace(seqkd.training, max_steps=None, epochs=1.0), splits.train, root
    )
    assert summary["monolingual"] == {"en-de": {"lines": 3, "kept": 0}}  # "", a copy (case aside), too long
    assert summary["dropped"] == {"empty": 6 + 1, "copy": 6 + 1, "length_ratio": 6 + 1}
    assert summary["teacher_targets"] == 6 and summary["rows"] == 24 == len(examples)
    flat = [e for rows in splits.train.values() for e in rows]
    assert sum(e.reference == "ok translation" for e in examples) == 6
    assert sum(a == b for a, b in zip(examples, flat, strict=True)) == 18


def test_drop_reasons():
    rule = TeacherFilter()
    assert drop_reason("Open the file", "  ", rule) == "empty"
    assert drop_reason("Open  the file", "open the FILE", rule) == "copy"
    assert drop_reason("Open the file", "x", rule) == "length_ratio"
    assert drop_reason("Open the file", "Datei öffnen", rule) is None
    assert drop_reason("Open the file", "", None) is None
    assert drop_reason("Open the file", "Open the file", TeacherFilter(copy=False)) is None


def test_monolingual_text_becomes_teacher_translated_rows(tiny, tmp_path):
    root, config, splits = tiny
    mono = tmp_path / "new-strings.txt"
    mono.write_text("close the chart\nsave the sheet\n")
    every = replace(config.training, max_steps=None, epochs=1.0)
    extra = with_data(config, monolingual={"en-fi": str(mono)})
    examples, summary = training_examples(extra, every, splits.train, root / "run")
    assert len(examples) == 26 and [e.source for e in examples[-2:]] == ["close the chart", "save the sheet"]
    assert all(e.pair == "en-fi" for e in examples[-2:]) and summary["teacher_targets"] == 2
    flat = [e for rows in splits.train.values() for e in rows]
    assert examples[:24] == flat  # data.targets: reference


def test_monolingual_reader_names_file_and_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\ufeffone\r\ntwo\n")
    assert [(r.id, r.example.source) for r in read_monolingual(good, "en-de")] == [
        ("en-de/mono/1", "one"),
        ("en-de/mono/2", "two"),
    ]
    for name, content, message in (
        ("blank.txt", b"one\n\nthree\n", "blank.txt:2: an empty line"),
        ("pairs.txt", b"one\tein\n", "pairs.txt:1: a tab"),
        ("latin1.txt", b"ok\ncaf\xe9\n", "latin1.txt:2: not valid UTF-8"),
        ("empty.txt", b"", "empty.txt: no sentence"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MlasLoraError, match=message):
            read_monolingual(tmp_path / name, "en-de")
    with pytest.raises(MlasLoraError, match="data.monolingual.en-de: no file"):
        read_monolingual(tmp_path / "missing.txt", "en-de")


def test_settings_off_leave_every_key_unchanged(tiny):
    from mlas_lora.experiments.pipeline import train_key
    from mlas_lora.experiments.run import hypothesis_keys

    _, config, _ = tiny
    inert = with_data(config, teacher_share=0.3, teacher_filter=TeacherFilter())  # targets: reference
    inert = replace(
        inert, training=replace(inert.training, distill=replace(inert.training.distill, temperature=3.0))
    )
    for name in ("lora", "mlas-lora"):
        assert train_key(resolve_system(name, inert)) == train_key(resolve_system(name, config))
        assert hypothesis_keys(resolve_system(name, inert)) == hypothesis_keys(resolve_system(name, config))
    seqkd = with_data(config, targets="teacher")
    assert train_key(resolve_system("lora", seqkd)) != train_key(resolve_system("lora", config))
    assert hypothesis_keys(resolve_system("zero-shot", seqkd)) == hypothesis_keys(
        resolve_system("zero-shot", config)
    )
    assert train_key(resolve_system("lora-seqkd", config)) == train_key(resolve_system("lora", seqkd))


def test_a_system_may_set_the_targets_but_no_other_data(tiny):
    _, config, _ = tiny
    with pytest.raises(MlasLoraError, match="data.corpus is the experiment's"):
        resolve_system({"name": "x", "method": "lora", "data": {"corpus": "elsewhere"}}, config)
    system = resolve_system({"name": "y", "preset": "lora", "data": {"targets": "mixed"}}, config)
    assert system.config.data.targets == "mixed" and system.config.data.corpus == config.data.corpus


def test_mismatched_tokenizers_are_refused_before_any_stage(tiny, tmp_path):
    from mlas_lora.models.loading import load_tokenizer
    from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer

    _, config, _ = tiny
    student = tmp_path / "student-261"
    tiny_model(vocab_size=261).save_pretrained(student)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(student)
    other = replace(config, output_dir=str(tmp_path / "run"), systems=["lora", "lora-kd"])
    other = replace(other, models=replace(other.models, student=str(student)))
    with pytest.raises(MlasLoraError) as err:
        resolve_systems(other)
    assert "'lora-kd': training.distill needs the teacher and the student to share one tokenizer" in str(
        err.value
    )
    sizes = [len(load_tokenizer(name)) for name in (config.models.teacher, str(student))]
    assert sizes[0] != sizes[
        1
    ] and f"vocabulary of {sizes[0]} tokens, the student '{student}' {sizes[1]}" in str(err.value)
    assert not (tmp_path / "run").exists()
    resolve_systems(replace(other, systems=["lora", "lora-seqkd"]))  # translations need no shared tokenizer


def test_a_teacher_without_the_chat_prompt_is_refused(tiny, tmp_path):
    from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer

    _, config, _ = tiny
    plain = tmp_path / "plain-teacher"
    tiny_model(role="teacher").save_pretrained(plain)
    tiny_tokenizer(chat=False).save_pretrained(plain)
    other = replace(config, systems=["lora-seqkd"], models=replace(config.models, teacher=str(plain)))
    with pytest.raises(MlasLoraError, match="has no chat template, so it cannot translate with the prompt"):
        resolve_systems(other)
    resolve_systems(replace(other, generation=replace(other.generation, chat=False)))


def test_the_distilled_systems_run_end_to_end(tiny):
    """lora-seqkd and lora-kd through `run_experiment`: their trainings, targets.json, the peak RSS
    in the training log and the report's section; a re-run translates and trains nothing."""
    from mlas_lora.experiments.run import run_experiment

    root, config, _ = tiny
    config = replace(config, output_dir=str(root / "e2e"), systems=["lora", "lora-seqkd", "lora-kd"])
    report = run_experiment(config).read_text()
    run = root / "e2e"
    targets = json.loads((run / "train-lora-seqkd/targets.json").read_text())
    assert targets["teacher_targets"] == targets["rows_read"] == 16
    assert not (run / "train-lora-kd/targets.json").exists()
    log = json.loads((run / "train-lora-kd/train_log.json").read_text())
    assert log["peak_rss_mb"] > 0 and log["steps"] == 2
    plain = json.loads((run / "train-lora/train_log.json").read_text())
    assert log["history"][0]["loss"] != plain["history"][0]["loss"]
    assert (
        "## Teacher translations as targets" in report
        and "| lora-seqkd | teacher | 16 of 24 | 16 | none |" in report
    )
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "distill-" in str(p)}
    run_experiment(config)
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_the_distilled_teacher_runs_in_bfloat16_only_where_that_is_fast(monkeypatch):
    """On a CPU without native bfloat16 (emulated: several times slower) the logits' teacher is float32,
    and the training key says which."""
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.experiments.distill import distill_teacher_dtype, key_parts

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = ExperimentConfig()
    config = replace(
        config, training=replace(config.training, distill=replace(config.training.distill, weight=0.5))
    )
    parts = {}
    for fast in (True, False):
        monkeypatch.setattr("mlas_lora.models.loading.cpu_has_fast_bf16", lambda fast=fast: fast)
        parts[fast] = (distill_teacher_dtype(), key_parts(config)["distill_teacher"]["dtype"])
    assert parts == {True: ("bfloat16", "bfloat16"), False: ("float32", "float32")}
