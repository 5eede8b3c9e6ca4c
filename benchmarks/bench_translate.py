"""Translation speed of `translate()` (continuous batching + prefix cache) against the default before it.

    segments/s   new translate() / old          targets: base, LoRA, routed >= 4.0; teacher >= 3.0

`old` is the default before continuous batching: the bucketed greedy loop (`decoder="shrink"`, finished
rows leave their bucket), batches of 10 (the shipped configs' `generation.batch_size`), no prefix
cache, the training precision. `new` is today's `translate()` with its defaults. For each model, base
student, PEFT LoRA and routed student (unmerged, float32 LoRA weights computed under the bf16 autocast
as in training, B factors small random non-zero values so no LoRA is a no-op) and the teacher,
`--per-pair` test segments of every pair (the embedded corpus, zero-shot requests) are translated one
pair per call, as the experiments call `translate()`; the routed student gets
`batch_context=routed.routing`. `--extra` adds settings: `new-b32` (batch 32), `new-p0` (no prefix
cache), `new-t1` (one thread), `all` / `all-b32` (every pair in one call, as the experiments call
`translate()` since 2026-12-05), `gen-b8` (Hugging Face `generate` at batch 8), `old-b4` (the old path
at batch 4). They run interleaved, rotating which goes first each round, and the report gives the
median time. Columns: segments/s; tokens/s (the tokens the new path generated, per second); rows the
output head saw; peak RSS during the setting's rounds (VmHWM, reset before each); hypotheses equal to
old's; BLEU and chrF++ (average over pairs). Greedy hypotheses move with the batch composition in bf16
(measure_noise_band.py measures by how much), so `=old` is information, not a criterion.

    python benchmarks/bench_translate.py --tiny
    python benchmarks/bench_translate.py --models base,lora,routed,teacher --per-pair 50
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import bench_training
import torch
from bench_generation import routed_student
from bench_scoring import status_kb
from bench_training import common_arguments, load_base, pair_examples

from mlas_lora.translation.baselines import zero_shot_requests
from mlas_lora.translation.generate import GenerationConfig, translate

TARGETS = {"base": 4.0, "lora": 4.0, "routed": 4.0, "teacher": 3.0}
MODELS = tuple(TARGETS)
TEACHER = "qwen2.5-coder-1.5b-instruct"

OLD = GenerationConfig(batch_size=10, prefix_cache=False)
"""The default before continuous batching (with `decoder="shrink"`): buckets of 10, no prefix cache."""


def settings(args) -> dict:
    """name -> (translate function, GenerationConfig, threads): `old`, `new`, then `--extra`."""
    old = partial(translate, decoder="shrink")
    new = GenerationConfig(batch_size=args.batch_size)
    out = {"old": (old, OLD, args.threads, False), "new": (translate, new, args.threads, False)}
    for name in filter(None, args.extra.split(",")):  # new-b32, new-t1, new-p0, gen-b8, old-b4, all-b32
        parts = {part[0]: int(part[1:]) for part in name.split("-")[1:]}
        if name.startswith(("new", "all")):
            fn, config = (
                translate,
                replace(
                    new, batch_size=parts.get("b", args.batch_size), prefix_cache=bool(parts.get("p", 1))
                ),
            )
        elif name.startswith("gen"):
            fn, config = partial(translate, decoder="generate"), replace(OLD, batch_size=parts.get("b", 8))
        else:
            fn, config = old, replace(OLD, batch_size=parts.get("b", OLD.batch_size))
        out[name] = (fn, config, parts.get("t", args.threads), name.startswith("all"))
    return out


def peft_lora(args):
    """A PEFT LoRA of rank r_gen + r_spe on the target projections, float32, random non-zero B."""
    peft, tokenizer = bench_training.peft_lora(args)
    peft.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * args.b_std)
    return peft, tokenizer, None


def replace_model(args, model: str):
    """`args` with another model (the tiny teacher with --tiny)."""
    out = argparse.Namespace(**vars(args))
    out.model = model
    return out


def build(args, kind: str, pairs: list[str]):
    """(model, tokenizer, batch_context) of one model kind."""
    if kind == "base":
        model, tokenizer = load_base(args)
        return model.requires_grad_(False), tokenizer, None
    if kind == "teacher":
        model, tokenizer = load_base(replace_model(args, TEACHER))
        return model.requires_grad_(False), tokenizer, None
    if kind == "lora":
        return peft_lora(args)
    routed, tokenizer = routed_student(args, pairs)
    return routed, tokenizer, routed.routing


def runner(model, tokenizer, context, by_pair: dict, setting):
    """A callable translating every pair's requests with one setting; returns (s, hyps, row-steps, peak kB)."""
    fn, config, threads, one_call = setting
    head = model.get_output_embeddings()
    groups = [[r for reqs in by_pair.values() for r in reqs]] if one_call else list(by_pair.values())

    def run():
        rows = []
        handle = head.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
        torch.set_num_threads(threads)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        try:
            hyps = [h for reqs in groups for h in fn(model, tokenizer, reqs, config, context, False)]
        finally:
            handle.remove()
        return time.perf_counter() - start, hyps, sum(rows), status_kb("VmHWM")

    return run


def measure(args, kind: str, pairs: list[str], examples: dict) -> dict:
    """Per setting: median seconds, last hypotheses, row-steps and the largest peak RSS."""
    model, tokenizer, context = build(args, kind, pairs)
    by_pair = {p: zero_shot_requests(examples[p]) for p in pairs}
    runs = {name: runner(model, tokenizer, context, by_pair, s) for name, s in settings(args).items()}
    results = {name: {"times": [], "peak": 0} for name in runs}
    names = list(runs)
    for i in range(args.warmup + args.repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, hyps, steps, peak = runs[name]()
            entry = results[name]
            entry.update(hyps=hyps, steps=steps, peak=max(entry["peak"], peak))
            if i >= args.warmup:
                entry["times"].append(seconds)
    del model, context
    gc.collect()
    return results


def quality(hyps: list[str], examples: dict) -> tuple[float, float]:
    """(BLEU, chrF++) averaged over pairs: what a change of hypotheses does to the scores."""
    from mlas_lora.evaluation.metrics import score_corpus

    scores, start = [], 0
    for ex in examples.values():
        part, start = hyps[start : start + len(ex)], start + len(ex)
        s = score_corpus(part, [e.reference for e in ex], ex[0].tgt_lang, metrics=("bleu", "chrf"))
        scores.append((s["bleu"].score, s["chrf"].score))
    return tuple(sum(col) / len(scores) for col in zip(*scores, strict=True))


def report(args, pairs, n_segments: int, all_results: dict, examples: dict) -> None:
    name = "tiny qwen2 student (2 layers, hidden 32)" if args.tiny else args.model
    print(f"student: {name}; threads {args.threads}; pairs {','.join(pairs)}; {n_segments} segments")
    print(
        f"zero-shot requests, one pair per translate() call, greedy; old: bucketed loop (shrink), batch "
        f"{OLD.batch_size}, no prefix cache; new: translate(), batch {args.batch_size}, prefix cache; "
        f"precision {OLD.precision}; LoRA r {args.r_gen + args.r_spe} (peft) / {args.r_gen} + {args.r_spe} "
        f"(routed), unmerged, B std {args.b_std}; {args.warmup} warm-up + {args.repeats} measured rounds"
    )
    print(
        f"{'model':<8} {'setting':<9} {'seg/s':>7} {'tok/s':>7} {'head rows':>9} "
        f"{'peak MiB':>9} {'=old':>8} {'BLEU':>6} {'chrF++':>6} {'vs old':>7}"
    )
    for kind, results in all_results.items():
        old = results["old"]
        tokens = results["new"]["steps"]
        old_seconds = statistics.median(old["times"])
        for setting, r in results.items():
            seconds = statistics.median(r["times"])
            as_old = sum(a == b for a, b in zip(r["hyps"], old["hyps"], strict=True))
            bleu, chrf = quality(r["hyps"], examples)
            print(
                f"{kind:<8} {setting:<9} {n_segments / seconds:>7.3f} {tokens / seconds:>7.1f} "
                f"{r['steps']:>9} {r['peak'] / 1024:>9.0f} {as_old:>4}/{n_segments:<3} "
                f"{bleu:>6.2f} {chrf:>6.2f} {old_seconds / seconds:>7.2f}"
            )
    for kind, results in all_results.items():
        ratio = statistics.median(results["old"]["times"]) / statistics.median(results["new"]["times"])
        peak = results["new"]["peak"] / max(results["old"]["peak"], 1)
        verdict = "ok" if ratio >= TARGETS[kind] else "MISSED"
        print(
            f"{kind}: segments/s new / old = {ratio:.2f} (target >= {TARGETS[kind]:.1f}: {verdict}); "
            f"peak RSS new / old = {peak:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--models", default=",".join(MODELS), help="some of base,lora,routed,teacher")
    parser.add_argument(
        "--per-pair", type=int, help="test segments of every pair (default 50; 3 with --tiny)"
    )
    parser.add_argument("--batch-size", type=int, default=GenerationConfig().batch_size)
    parser.add_argument(
        "--extra",
        default="",
        help="more settings: new-b32 (batch 32), new-t1 (1 thread), new-p0 (prefix_cache off), "
        "all / all-b32 (every pair in one call), "
        "gen-b8 (HF generate at batch 8), old-b4 (the old path at batch 4)",
    )
    parser.add_argument("--b-std", type=float, default=0.01, help="std of the random LoRA B factors")
    parser.add_argument("--repeats", type=int, default=1, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured rounds first")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: bf16 where the CPU has it)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 with --tiny)")
    args = parser.parse_args()
    args.per_pair = args.per_pair or (3 if args.tiny else 50)
    args.threads = args.threads or (1 if args.tiny else torch.get_num_threads())
    pairs = args.pairs.split(",")
    examples = pair_examples(pairs, args.per_pair, "test")
    n_segments = sum(len(v) for v in examples.values())
    all_results = {kind: measure(args, kind, pairs, examples) for kind in args.models.split(",")}
    report(args, pairs, n_segments, all_results, examples)


if __name__ == "__main__":
    main()
