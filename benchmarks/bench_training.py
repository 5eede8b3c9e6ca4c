"""Training step of the routed multi-LoRA student (Eq. 9) against one PEFT LoRA of the same total rank.

    time   routed step (r_gen + r_spe, mixed-pair micro-batches) / PEFT step (r = r_gen + r_spe)
                                                                               target <= 1.10

Both systems see the same micro-batches of real training examples (the embedded corpus, featurized
and collated as the trainer does; each micro-batch mixes the pairs in equal shares) and do what
`Trainer.train_step` does: forward under bf16 autocast (when the model is bf16), next-token loss
on the target tokens (logits only there), backward, AdamW step, `zero_grad(set_to_none=True)`.
LoRA weights are float32 in both (PEFT's `autocast_adapter_dtype`). The steps are interleaved
(A B, B A, A B, ...) after warm-up steps, so load on the machine hits both alike; the report gives the median step time of each system, the
ratio of the medians (the target) and the median of the per-batch ratios (paired, for reference).

    python benchmarks/bench_training.py --tiny
    python benchmarks/bench_training.py                      # the embedded 0.5B student
    python benchmarks/bench_training.py --repeats 3 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.data.records import Example
from mlas_lora.models.arch import PROJECTION_PATHS, PROJECTIONS
from mlas_lora.training.data import collate, featurize
from mlas_lora.training.loss import IGNORE, predicting_positions, target_loss

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_PAIRS = "en-cs,en-de,en-et,en-fi"
TARGET = 1.10


def load_base(args):
    """(model, tokenizer): a fresh copy per call, since both LoRA kinds wrap their model in place."""
    if args.tiny:
        from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer

        return tiny_model("qwen2", "student"), tiny_tokenizer()
    from mlas_lora.models.loading import load_model

    return load_model(args.model, dtype=args.dtype, device="cpu")  # a CPU benchmark (README)


def pair_examples(pairs: list[str], per_pair: int, split: str) -> dict[str, list[Example]]:
    """`per_pair` examples of each pair from the embedded corpus, or synthetic ones without it."""
    from mlas_lora.data.embedded import embedded_available, load_embedded

    langs = tuple(sorted({lang for p in pairs for lang in p.split("-") if lang != "en"}))
    if embedded_available(langs):
        return {p: load_embedded(p, split, limit=per_pair, min_words=4) for p in pairs}
    print("note: embedded corpus not prepared, using synthetic sentences")
    words = "the cat sat on a mat while a dog ran to the house and back again".split()
    return {
        p: [
            Example(*p.split("-"), " ".join(words[: 5 + i % 9]), " ".join(reversed(words[: 5 + i % 7])))
            for i in range(per_pair)
        ]
        for p in pairs
    }


def mixed_batches(
    tokenizer, pairs: list[str], n_batches: int, micro_batch: int, max_tokens: int
) -> list[dict]:
    """Collated micro-batches, each holding micro_batch / len(pairs) examples of every pair, interleaved."""
    share = max(1, micro_batch // len(pairs))
    by_pair = pair_examples(pairs, share * n_batches, "train")
    batches = []
    for b in range(n_batches):
        chosen = [by_pair[p][b * share + k] for k in range(share) for p in pairs]
        features = featurize(tokenizer, chosen, pairs, max_tokens)
        batches.append(collate(features, tokenizer.pad_token_id or 0))
    return batches


def routed_system(args, pairs: list[str]):
    model, tokenizer = load_base(args)
    targets = [t for t in PROJECTIONS if t in args.targets.split(",")]
    routed = attach_routed_lora(model, pairs, targets, args.r_gen, args.r_spe, 16.0, 16.0)
    if args.residual:  # residual mode's cost does not depend on where the factors came from
        routed.freeze_initial()
    return routed.train(), list(routed.lora_parameters()), routed.routing, tokenizer


def peft_lora(args):
    """(PEFT model, tokenizer): one LoRA of rank r_gen + r_spe on the target projections, float32 factors."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(args)
    rank = args.r_gen + args.r_spe
    modules = [PROJECTION_PATHS[t].split(".")[-1] for t in args.targets.split(",")]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=modules)
    return get_peft_model(model, config, autocast_adapter_dtype=True), tokenizer


def peft_system(args):
    peft = peft_lora(args)[0].train()
    return peft, [p for p in peft.parameters() if p.requires_grad], None


def step_runner(model, params, route):
    """A callable doing one trainer step on a collated batch; returns its wall time in seconds."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    bf16 = next(model.parameters()).dtype == torch.bfloat16  # the trainer's `bf16=_bf16(model)`

    def run(batch: dict) -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        context = route(batch["pair_ids"]) if route else contextlib.nullcontext()
        with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                logits_to_keep=predicting_positions(batch["labels"] != IGNORE),
            ).logits
        target_loss(logits, batch["labels"])[0].backward()
        optimizer.step()
        return time.perf_counter() - start

    return run


def interleaved(runs: dict, batches: list[dict], warmup: int) -> dict[str, list[float]]:
    """Run every system on every batch, alternating which goes first; drop the first `warmup` batches."""
    times = {name: [] for name in runs}
    names = list(runs)
    for i, batch in enumerate(batches):
        for name in names if i % 2 == 0 else names[::-1]:
            elapsed = runs[name](batch)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both LoRA benchmarks share: which model, which pairs, which LoRAs."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name or checkpoint dir")
    parser.add_argument("--tiny", action="store_true", help="use the in-process tiny student instead")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="comma-separated language pairs")
    parser.add_argument("--targets", default=",".join(PROJECTIONS), help="projections that get LoRAs")
    parser.add_argument("--r-gen", type=int, default=8)
    parser.add_argument("--r-spe", type=int, default=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, help="per example (default 256; 64 with --tiny)")
    parser.add_argument("--repeats", type=int, default=6, help="measured steps per system")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per system first")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: bf16 where the CPU has it)")
    parser.add_argument(
        "--residual", action="store_true", help="routed LoRAs in residual (function-preserving) mode"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (64 if args.tiny else 256)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs = args.pairs.split(",")

    routed, routed_params, route, tokenizer = routed_system(args, pairs)
    peft, peft_params, _ = peft_system(args)
    batches = mixed_batches(tokenizer, pairs, args.warmup + args.repeats, args.micro_batch, args.max_tokens)
    runs = {"routed": step_runner(routed, routed_params, route), "peft": step_runner(peft, peft_params, None)}
    times = interleaved(runs, batches, args.warmup)
    report(args, pairs, routed, batches, times)


def report(args, pairs, routed, batches, times) -> None:
    rank = args.r_gen + args.r_spe
    name = "tiny qwen2 student (2 layers, hidden 32)" if args.tiny else args.model
    tokens = [int(b["attention_mask"].sum()) for b in batches[args.warmup :]]
    dtype = next(routed.parameters()).dtype
    print(f"model: {name}; dtype {dtype}; threads {args.threads}; pairs {','.join(pairs)}")
    print(
        f"micro-batch {args.micro_batch} mixed-pair, {statistics.median(tokens):.0f} real tokens (median); "
        f"targets {args.targets}; {args.warmup} warm-up + {args.repeats} measured steps each, interleaved"
    )
    routed_s, peft_s = statistics.median(times["routed"]), statistics.median(times["peft"])
    paired = statistics.median(r / p for r, p in zip(times["routed"], times["peft"], strict=True))
    print(f"{'system':<34} {'median step s':>13}")
    mode = "residual" if args.residual else "default init"
    print(f"{f'routed r_gen {args.r_gen} + r_spe {args.r_spe}, {mode}':<34} {routed_s:>13.4f}")
    print(f"{f'peft single LoRA r {rank}':<34} {peft_s:>13.4f}")
    verdict = "ok" if routed_s / peft_s <= TARGET else "MISSED"
    print(f"time routed / peft = {routed_s / peft_s:.3f}  (target <= {TARGET:.2f}: {verdict})")
    print(f"     median of per-batch ratios = {paired:.3f}")


if __name__ == "__main__":
    main()
