"""Translation speed of `translate()` (the shrinking-batch greedy loop) against the previous path (HF generate).

    segments/s   new translate() / old (generate, batch 8, float32 LoRAs in float32)     target >= 2.0

For each model, base student, PEFT LoRA and routed student (all unmerged, LoRA weights float32,
B factors small random non-zero values so no LoRA is a no-op), `--per-pair` test segments of every
pair (the embedded corpus, zero-shot requests as the experiments build them) are translated one
pair at a time, as `experiments/run.py` and `pipeline.py` call `translate()`; the routed student
gets `batch_context=routed.routing`. Settings: `old`, the path before the speed work; `ref` (LoRA
and routed), the function `new` decodes (`precision: training`, the trainer's bf16 autocast) through
`generate` at batch 8, the reference for `new`'s hypotheses; `new`, today's `translate()` at
`--batch-size`; `--extra` adds settings that change batch size (`-b32`), threads (`-t1`), the
prefix cache (`-p1` on, `-p0` off), or `shrink`: `translate(decoder="shrink")`; `old-b4` etc. is the
previous path at another batch size, which shows how many hypotheses batching alone changes there. They run
interleaved, rotating which goes first each round, and the report gives the median time. Columns:
segments/s; tokens/s, the generated tokens every row needs (up to and including its stop token,
counted on the new loop) per second; row-steps, the rows the output head saw (the old path keeps
finished rows in the batch); peak RSS of the process during the setting's rounds (VmHWM, reset
before each); `same`, the hypotheses equal to ref's (base: old's); `=old`, equal to old's; BLEU and
chrF++ of the setting's hypotheses (average over pairs).

    python benchmarks/bench_translate.py --tiny
    python benchmarks/bench_translate.py --models base --per-pair 50 --repeats 1
    python benchmarks/bench_translate.py --models base,routed --per-pair 25 --extra new-p1,new-b32,new-b32-p1
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

TARGET = 2.0
MODELS = ("base", "lora", "routed")


OLD = GenerationConfig(batch_size=8, precision="weights")
"""The settings of `translate()` before this benchmark's work: HF generate, batches of 8, float32 LoRAs
computed in float32."""


def settings(args, kind: str) -> dict:
    """name -> (translate function, GenerationConfig, threads).

    `old`: the previous path (OLD through `generate`); `ref`: the same function `new` decodes (the
    training autocast, `precision: training`) through `generate` at batch 8, the reference its
    hypotheses must equal (for the all-bf16 base model it is `old` itself); `new`: today's `translate()`
    with `--batch-size` (default: GenerationConfig's)."""
    generate, shrinking = partial(translate, decoder="generate"), partial(translate, decoder="shrink")
    new = GenerationConfig(batch_size=args.batch_size)
    out = {"old": (generate, OLD, args.threads)}
    if kind != "base":
        out["ref"] = (generate, replace(OLD, precision=new.precision), args.threads)
    out["new"] = (translate, new, args.threads)
    for name in filter(None, args.extra.split(",")):  # new-b16, new-t1, new-p0 (no prefix cache), shrink
        parts = {part[0]: int(part[1:]) for part in name.split("-")[1:]}
        config = replace(
            new,
            batch_size=parts.get("b", args.batch_size),
            prefix_cache=bool(parts.get("p", new.prefix_cache)),
        )
        if name.startswith("old"):  # the previous path at another batch size: how much its own
            fn, config = generate, replace(OLD, batch_size=parts.get("b", 8))  # hypotheses move with batching
        else:
            fn = shrinking if name.startswith("shrink") else translate
        out[name] = (fn, config, parts.get("t", args.threads))
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


def build(args, kind: str, pairs: list[str]):
    """(model, tokenizer, batch_context) of one model kind."""
    if kind == "base":
        model, tokenizer = load_base(args)
        return model.requires_grad_(False), tokenizer, None
    if kind == "lora":
        return peft_lora(args)
    routed, tokenizer = routed_student(args, pairs)
    return routed, tokenizer, routed.routing


def runner(model, tokenizer, context, by_pair: dict, setting):
    """A callable translating every pair's requests with one setting; returns (s, hyps, row-steps, peak kB)."""
    fn, config, threads = setting
    head = model.get_output_embeddings()

    def run():
        rows = []
        handle = head.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
        torch.set_num_threads(threads)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        try:
            hyps = [
                h for reqs in by_pair.values() for h in fn(model, tokenizer, reqs, config, context, False)
            ]
        finally:
            handle.remove()
        return time.perf_counter() - start, hyps, sum(rows), status_kb("VmHWM")

    return run


def measure(args, kind: str, pairs: list[str], examples: dict) -> dict:
    """Per setting: median seconds, last hypotheses, row-steps and the largest peak RSS."""
    model, tokenizer, context = build(args, kind, pairs)
    by_pair = {p: zero_shot_requests(examples[p]) for p in pairs}
    runs = {name: runner(model, tokenizer, context, by_pair, s) for name, s in settings(args, kind).items()}
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
    print(f"model: {name}; threads {args.threads}; pairs {','.join(pairs)}; {n_segments} segments")
    print(
        f"zero-shot requests, one pair per translate() call, greedy; old: generate, batch 8, float32 LoRAs "
        f"in float32; new: translate(), batch {args.batch_size}, precision {GenerationConfig().precision}; "
        f"LoRA r {args.r_gen + args.r_spe} (peft) / {args.r_gen} + {args.r_spe} (routed), unmerged, "
        f"B std {args.b_std}; {args.warmup} warm-up + {args.repeats} measured rounds, interleaved"
    )
    print("same: hypotheses equal to ref's (the same function through generate at batch 8; base: old's)")
    print(
        f"{'model':<7} {'setting':<11} {'seg/s':>7} {'tok/s':>7} {'row-steps':>9} "
        f"{'peak MiB':>9} {'same':>8} {'=old':>8} {'BLEU':>6} {'chrF++':>6} {'vs old':>7}"
    )
    for kind, results in all_results.items():
        old = results["old"]
        ref = results.get("ref", old)
        tokens = results["new"]["steps"]
        old_seconds = statistics.median(old["times"])
        for setting, r in results.items():
            seconds = statistics.median(r["times"])
            same = sum(a == b for a, b in zip(r["hyps"], ref["hyps"], strict=True))
            as_old = sum(a == b for a, b in zip(r["hyps"], old["hyps"], strict=True))
            bleu, chrf = quality(r["hyps"], examples)
            print(
                f"{kind:<7} {setting:<11} {n_segments / seconds:>7.3f} {tokens / seconds:>7.1f} "
                f"{r['steps']:>9} {r['peak'] / 1024:>9.0f} {same:>4}/{n_segments:<3} {as_old:>4}/{n_segments:<3} "
                f"{bleu:>6.2f} {chrf:>6.2f} {old_seconds / seconds:>7.2f}"
            )
    for kind, results in all_results.items():
        ratio = statistics.median(results["old"]["times"]) / statistics.median(results["new"]["times"])
        verdict = "ok" if ratio >= TARGET else "MISSED"
        print(f"{kind}: segments/s new / old = {ratio:.2f}  (target >= {TARGET:.1f}: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--models", default=",".join(MODELS), help="some of base,lora,routed")
    parser.add_argument(
        "--per-pair", type=int, help="test segments of every pair (default 50; 3 with --tiny)"
    )
    parser.add_argument("--batch-size", type=int, default=GenerationConfig().batch_size)
    parser.add_argument(
        "--extra",
        default="",
        help="more settings: new-b16 (batch 16), new-t1 (1 thread), new-p0 (prefix_cache off), "
        "old-b4 (the old path at batch 4), shrink (translate(decoder='shrink'))",
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
