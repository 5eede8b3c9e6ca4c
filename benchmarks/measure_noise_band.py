"""The decoding noise band: how much corpus BLEU / chrF++ move with the batch size of the reference decode,
and whether the fast path (continuous batching + prefix cache) lands inside that band.

Greedy decoding is not a function of the segment alone in bf16: which rows share a GEMM and how much left
padding sits before a row change the rounding, and a 0.5B student meets many near-ties. So "identical
hypotheses" is no criterion (the reference disagrees with itself across batch sizes); the criterion is
that the fast path's scores lie within the spread of the reference's own scores.

For each model (base student, PEFT LoRA, routed MLAS-LoRA student: the LoRA factors random, as in
bench_translate.py, since this script trains nothing), the `--per-pair` test segments of each pair are
decoded one pair per call, as the experiments do, by:
  ref-bN  the bucketed greedy loop at batch N (N = 4, 8, 16), no prefix cache: the bits of Hugging Face
          `generate` at that batch size (tests/test_generation_speed.py), the decode before continuous
          batching;
  fast    `translate()` with today's defaults (continuous batching, prefix cache, batch 64);
  fast-bN the same at batch N (4, 8, 16, 32): the fast path's own spread. It gives each row its own
          token budget (length_ratio x its source + margin), where the bucketed loop gives a bucket the
          budget of its longest source, so a row that never stops is cut at another length there.
It prints, per model, each setting's BLEU and chrF++ (averaged over pairs), the band [min, max] over the
ref-bN, whether `fast` lies inside, and how many hypotheses each shares with ref-b8. Results go to
`--out` as JSON (hypotheses included) after every setting, so an interrupted run resumes by setting and a
rerun with more models adds to them.

    python benchmarks/measure_noise_band.py --models base,lora,routed --per-pair 100
    python benchmarks/measure_noise_band.py --tiny --per-pair 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_training import common_arguments, pair_examples
from bench_translate import build, quality

from mlas_lora.translation.baselines import zero_shot_requests
from mlas_lora.translation.generate import GenerationConfig, translate

REFERENCE_BATCHES = (4, 8, 16)


def settings() -> dict:
    out = {
        f"ref-b{b}": ("shrink", GenerationConfig(batch_size=b, prefix_cache=False)) for b in REFERENCE_BATCHES
    }
    out["fast"] = ("auto", GenerationConfig())
    for b in (*REFERENCE_BATCHES, 32):  # the fast path's own spread over batch sizes
        out[f"fast-b{b}"] = ("auto", GenerationConfig(batch_size=b))
    return out


def decode(model, tokenizer, context, examples: dict, decoder: str, config) -> tuple[list[str], float]:
    start = time.perf_counter()
    hyps = [
        h
        for ex in examples.values()
        for h in translate(
            model, tokenizer, zero_shot_requests(ex), config, context, progress=False, decoder=decoder
        )
    ]
    return hyps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--models", default="base,lora,routed")
    parser.add_argument("--per-pair", type=int, default=100)
    parser.add_argument("--b-std", type=float, default=0.01, help="std of the random LoRA B factors")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="noise_band.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = args.pairs.split(",")
    examples = pair_examples(pairs, args.per_pair, "test")
    n = sum(len(v) for v in examples.values())
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for kind in args.models.split(","):
        model, tokenizer, context = build(args, kind, pairs)
        results.setdefault(kind, {})
        for name, (decoder, config) in settings().items():
            if len(results[kind].get(name, {}).get("hyps", ())) == n:
                continue  # measured by an earlier, interrupted run
            hyps, seconds = decode(model, tokenizer, context, examples, decoder, config)
            bleu, chrf = quality(hyps, examples)
            results[kind][name] = {"bleu": bleu, "chrf": chrf, "seconds": seconds, "hyps": hyps}
            print(f"{kind} {name}: BLEU {bleu:.2f} chrF++ {chrf:.2f} ({n / seconds:.2f} seg/s)", flush=True)
            out_path.write_text(json.dumps(results, ensure_ascii=True))
        del model, context
    report(results, n, args)


def report(results: dict, n: int, args) -> None:
    print(f"\n{n} test segments ({args.per_pair} per pair, {args.pairs}), threads {args.threads}")
    print(f"{'model':<7} {'setting':<8} {'BLEU':>6} {'chrF++':>7} {'=ref-b8':>8} {'seg/s':>6}")
    for kind, by_setting in results.items():
        base = by_setting["ref-b8"]["hyps"]
        for name, r in by_setting.items():
            same = sum(a == b for a, b in zip(r["hyps"], base, strict=True))
            print(
                f"{kind:<7} {name:<8} {r['bleu']:>6.2f} {r['chrf']:>7.2f} {same:>4}/{n:<3} {n / r['seconds']:>6.2f}"
            )
        for metric in ("bleu", "chrf"):
            band = [by_setting[f"ref-b{b}"][metric] for b in REFERENCE_BATCHES]
            fast = by_setting["fast"][metric]
            inside = min(band) <= fast <= max(band)
            own = [r[metric] for name, r in by_setting.items() if name.startswith("fast")]
            print(
                f"{kind}: {metric} band [{min(band):.2f}, {max(band):.2f}] (width {max(band) - min(band):.2f}); "
                f"fast {fast:.2f}: {'inside' if inside else 'OUTSIDE'}"
                + ("" if inside else f" by {min(abs(fast - min(band)), abs(fast - max(band))):.2f}")
                + f"; the fast path over batch sizes [{min(own):.2f}, {max(own):.2f}]"
            )


if __name__ == "__main__":
    main()
