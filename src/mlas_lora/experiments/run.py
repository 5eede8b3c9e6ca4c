"""`mlas-lora run CONFIG.yaml`: every stage of an experiment, then the Table-1-style report.

Each system's hypotheses are written per split and direction under `RUN/hyps/`, keyed by a hash
of everything that produced them, so a re-run skips what is done and an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlas_lora.config import config_hash, save_yaml, to_dict
from mlas_lora.data.records import Example
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.data import Splits, load_splits
from mlas_lora.translation.baselines import in_context_requests, zero_shot_requests
from mlas_lora.translation.generate import GenerationConfig, translate


def generation_config(config: ExperimentConfig) -> GenerationConfig:
    g = config.generation
    return GenerationConfig(batch_size=g.batch_size, num_beams=g.num_beams, max_new_tokens=g.max_new_tokens, chat=g.chat)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def write_manifest(config: ExperimentConfig, run_dir: Path) -> None:
    """The resolved config and the versions that produced this run directory."""
    import torch
    import transformers

    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(config, run_dir / "config.yaml")
    manifest = {
        "config_hash": config_hash(config),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": config.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(run_dir / "manifest.json", manifest)


class HypothesisStore:
    """Hypotheses of one system on one split and direction, cached as JSONL with the key that made them."""

    def __init__(self, run_dir: Path):
        self.root = run_dir / "hyps"

    def path(self, system: str, split: str, direction: str) -> Path:
        return self.root / system / f"{split}.{direction}.jsonl"

    def load(self, system: str, split: str, direction: str, key: str) -> list[str] | None:
        path = self.path(system, split, direction)
        if not path.is_file():
            return None
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        if not lines or lines[0].get("key") != key:
            return None
        return [row["hypothesis"] for row in lines[1:]]

    def save(self, system: str, split: str, direction: str, key: str, examples, hyps, seconds: float) -> None:
        path = self.path(system, split, direction)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"key": key, "seconds": round(seconds, 2)}]
        rows += [{"source": e.source, "reference": e.reference, "hypothesis": h} for e, h in zip(examples, hyps, strict=True)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
        os.replace(tmp, path)


# A system's translator: (examples of one direction, split) -> hypotheses.
Translator = Callable[[list[Example], str], list[str]]


def prompting_translator(system: str, model, tokenizer, splits: Splits, config: ExperimentConfig) -> Translator:
    """0-shot or 5-shot in-context translation with the untuned student."""
    gen = generation_config(config)

    def run(examples: list[Example], split: str) -> list[str]:
        if system == "zero-shot":
            requests = zero_shot_requests(examples)
        else:
            train = splits.train.get(examples[0].pair, [])
            requests = in_context_requests(examples, train, shots=config.data.shots, seed=config.seed)
        return translate(model, tokenizer, requests, gen, desc=f"{system} {split} {examples[0].pair}")

    return run


def translate_all(system: str, translator: Translator, splits: Splits, store: HypothesisStore, key: str):
    """Hypotheses for every evaluated split and direction, reusing cached ones; returns seconds spent."""
    outputs: dict[tuple[str, str], list[str]] = {}
    seconds = 0.0
    for split in ("test", "ood"):
        for direction, examples in splits.get(split).items():
            if not examples:
                continue
            hyps = store.load(system, split, direction, key)
            if hyps is None:
                start = time.perf_counter()
                hyps = translator(examples, split)
                spent = time.perf_counter() - start
                seconds += spent
                store.save(system, split, direction, key, examples, hyps, spent)
            outputs[(split, direction)] = hyps
    return outputs, seconds


def evaluate_outputs(system: str, outputs, splits: Splits, config: ExperimentConfig) -> list[dict]:
    """Score every (split, direction) of one system: one record per metric."""
    from mlas_lora.evaluation.metrics import score_corpus

    records = []
    for (split, direction), hyps in outputs.items():
        examples = splits.get(split)[direction]
        scores = score_corpus(
            hyps, [e.reference for e in examples], examples[0].tgt_lang, metrics=tuple(config.evaluation.metrics),
            sources=[e.source for e in examples], comet_model=config.evaluation.comet_model,
        )
        for metric, result in scores.items():
            records.append({
                "system": system, "split": split, "direction": direction, "metric": metric,
                "score": result.score if result.available else None, "signature": result.signature,
                "n_segments": result.n_segments, "available": result.available, "reason": result.reason,
                "config_hash": config_hash(config),
            })
    return records


def significance(all_outputs, splits: Splits, config: ExperimentConfig) -> list[dict]:
    """Paired bootstrap of MLAS-LoRA (or the last system) against the configured baseline, per direction."""
    from mlas_lora.evaluation.metrics import paired_bootstrap

    baseline = config.evaluation.baseline_for_significance
    challenger = "mlas-lora" if "mlas-lora" in all_outputs else config.systems[-1]
    if baseline not in all_outputs or challenger == baseline:
        return []
    rows = []
    for (split, direction), hyps in all_outputs[challenger].items():
        examples = splits.get(split)[direction]
        for metric in ("bleu", "chrf"):
            result = paired_bootstrap(
                hyps, all_outputs[baseline][(split, direction)], [e.reference for e in examples],
                examples[0].tgt_lang, metric=metric, n_samples=config.evaluation.bootstrap_samples, seed=config.seed,
            )
            rows.append({"system": challenger, "baseline": baseline, "split": split, "direction": direction,
                         "metric": metric, **result})
    return rows
