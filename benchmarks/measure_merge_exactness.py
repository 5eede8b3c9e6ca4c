"""How far a bf16 merge moves trained adapters away from the trained function (logits, BLEU, chrF++).

For each trained system of a run (plain LoRA through PEFT, MLAS-LoRA routed), on the run's own test
split:

    logits     teacher-forced prompt + reference of the first `--prompts` test segments (spread over
               the directions), at the positions that predict a target token: mean and max |difference|
               of each way of evaluating against the unmerged adapters
    quality    BLEU and chrF++ of the greedy translations of every test segment, and the seconds taken

Ways of evaluating: `unmerged` (adapters beside the frozen bf16 weights: the trained function, the
default since this measurement), `merged-bf16` (the update folded into the bf16 weights, the old
default; PEFT's merge_and_unload) and, for routed systems, `merged-fp32` (W + B A kept in float32).

    python benchmarks/measure_merge_exactness.py configs/demo.yaml output_dir=runs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mlas_lora.config import load_config
from mlas_lora.evaluation.metrics import score_corpus
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.data import load_splits
from mlas_lora.experiments.pipeline import initial_student, train_dir
from mlas_lora.experiments.systems import find_system, resolve_systems
from mlas_lora.prompting import training_ids
from mlas_lora.training.trainer import newest_checkpoint
from mlas_lora.translation.baselines import zero_shot_requests
from mlas_lora.translation.generate import translate


def trained(name: str, config: ExperimentConfig, splits, run_dir: Path):
    """The system's student with the adapters of its newest checkpoint, unmerged, in eval mode."""
    system = find_system(resolve_systems(config), name)
    checkpoint = newest_checkpoint(train_dir(system, run_dir))
    if checkpoint is None:
        raise SystemExit(f"{train_dir(system, run_dir)} has no checkpoint: train the system first")
    student = initial_student(system, splits, run_dir)
    system.method.load(student, checkpoint / "adapters")
    student.model.eval()
    return student.model, student.tokenizer, system.method.route(student)


@torch.no_grad()
def target_logits(model, tokenizer, examples, route) -> list[torch.Tensor]:
    """float32 logits at the target-predicting positions of each example, run one at a time."""
    out = []
    for example in examples:
        prompt, target = training_ids(tokenizer, example)
        ids = torch.tensor([prompt + target])
        with route([example.pair]) if route else nullcontext():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        out.append(logits.float())
    return out


def differences(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    diffs = [(a - b).abs() for a, b in zip(reference, other, strict=True)]
    total = sum(d.sum().item() for d in diffs)
    count = sum(d.numel() for d in diffs)
    return {"mean_abs": total / count, "max_abs": max(d.max().item() for d in diffs)}


def quality(model, tokenizer, test: dict, config, route, scope) -> dict:
    hyps, refs, start = {}, {}, time.perf_counter()
    for direction, examples in test.items():
        with scope(direction):
            hyps[direction] = translate(
                model,
                tokenizer,
                zero_shot_requests(examples),
                config.generation,
                batch_context=route,
                progress=False,
            )
        refs[direction] = [e.reference for e in examples]
    seconds = time.perf_counter() - start
    scores = {
        d: {
            m: r.score
            for m, r in score_corpus(hyps[d], refs[d], test[d][0].tgt_lang, metrics=("bleu", "chrf")).items()
        }
        for d in test
    }
    avg = {m: sum(s[m] for s in scores.values()) / len(scores) for m in ("bleu", "chrf")}
    return {"seconds": round(seconds, 1), "per_direction": scores, "average": avg, "hypotheses": hyps}


def measure(system: str, config, splits, run_dir: Path, n_prompts: int) -> dict:
    model, tokenizer, route = trained(system, config, splits, run_dir)
    routed = route is not None
    per_direction = -(-n_prompts // len(splits.test))
    prompts = [e for examples in splits.test.values() for e in examples[:per_direction]][:n_prompts]
    ways = {"unmerged": (route, lambda d: nullcontext())}
    if routed:
        ways["merged-bf16"] = (None, lambda d: model.merged(d))
        ways["merged-fp32"] = (None, lambda d: model.merged(d, dtype=torch.float32))
    results, reference = {}, None
    for name, (way_route, scope) in ways.items():
        logits = []
        for example in prompts:
            with scope(example.pair):
                logits += target_logits(model, tokenizer, [example], way_route)
        reference = reference or logits
        results[name] = {
            "logits_vs_unmerged": differences(reference, logits),
            **quality(model, tokenizer, splits.test, config, way_route, scope),
        }
    if not routed:  # PEFT: merge in place (bf16), then the same measurements
        merged = model.merge_and_unload()
        logits = target_logits(merged, tokenizer, prompts, None)
        results["merged-bf16"] = {
            "logits_vs_unmerged": differences(reference, logits),
            **quality(merged, tokenizer, splits.test, config, None, lambda d: nullcontext()),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--systems", default="lora,mlas-lora-residual,mlas-lora-add")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument(
        "--out", help="JSON file for every number and hypothesis (default: RUN/merge_exactness.json)"
    )
    args = parser.parse_args()
    config = load_config(ExperimentConfig, args.config, args.overrides)
    run_dir = Path(config.output_dir)
    splits = load_splits(config.data, ("train", "dev", "test"))
    report = {}
    print("| system | evaluated | logits mean abs diff | max abs diff | BLEU avg | chrF++ avg | seconds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for system in args.systems.split(","):
        report[system] = measure(system, config, splits, run_dir, args.prompts)
        for way, r in report[system].items():
            diff = r["logits_vs_unmerged"]
            print(
                f"| {system} | {way} | {diff['mean_abs']:.4f} | {diff['max_abs']:.3f} | "
                f"{r['average']['bleu']:.2f} | {r['average']['chrf']:.2f} | {r['seconds']:.0f} |",
                flush=True,
            )
    out = Path(args.out) if args.out else run_dir / "merge_exactness.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
