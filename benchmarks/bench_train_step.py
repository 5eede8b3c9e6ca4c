"""Optimizer steps of the routed student at the CPU budget: the trainer's micro-batches as they are, against
the same steps with `training.group_by_length` (and smaller micro-batches at the same examples per step).

    examples/s   grouped / today's (micro_batch 8 x grad_accum 2, shuffled)      target >= 1.3

Every setting runs the real `Trainer.train_step` (bf16 autocast, target-token loss, backward, AdamW) on
the routed student (r 8 + 8, all 7 projections, 4 pairs, mixed micro-batches) over the embedded
corpus's training examples (`--per-direction` of each pair, as the cpu budget reads 2,000), and the first
`--steps` optimizer steps of the seeded epoch order: every setting sees the same 16 examples at step k
(tests/test_training.py). Settings are interleaved step by step, rotating which goes first; the report
gives each setting's median step time, examples/s, tokens per forward (padding included) and the share of
padding.

    python benchmarks/bench_train_step.py                # 6 steps per setting
    python benchmarks/bench_train_step.py --tiny
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_training import DEFAULT_MODEL, load_base, pair_examples

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.trainer import Trainer, _PairLoss

TARGET = 1.3
SETTINGS = {  # name -> (micro_batch, grad_accum, group_by_length)
    "today 8x2": (8, 2, False),
    "grouped 8x2": (8, 2, True),
    "grouped 4x4": (4, 4, True),
    "grouped 2x8": (2, 8, True),
}


def trainer_of(args, model, tokenizer, examples, pairs, setting, folder: Path) -> Trainer:
    micro, accum, group = setting
    config = TrainingConfig(
        lr=1e-4, micro_batch=micro, grad_accum=accum, group_by_length=group, max_steps=args.steps + 1
    )
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    return Trainer(
        model,
        tokenizer,
        examples,
        pairs,
        config,
        folder,
        model.routing,
        lambda p: None,
        lambda p: None,
        bf16=bf16,
    )


def padding(trainer: Trainer, steps: int) -> tuple[float, float]:
    """(share of padding tokens, mean tokens per forward) over the first `steps` steps."""
    real = padded = forwards = 0
    for step in range(steps):
        for batch in trainer._step_micro_batches(step):
            lengths = [len(f.input_ids) for f in batch]
            real, padded, forwards = real + sum(lengths), padded + max(lengths) * len(lengths), forwards + 1
    return 1 - real / padded, padded / forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per setting (+1 warm-up)")
    parser.add_argument("--per-direction", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = ["en-cs", "en-de", "en-et", "en-fi"]
    by_pair = pair_examples(pairs, 64 if args.tiny else args.per_direction, "train")
    examples = [e for p in pairs for e in by_pair[p]]
    base, tokenizer = load_base(args)
    torch.manual_seed(0)
    model = attach_routed_lora(base, pairs, r_gen=8, r_spe=8).train()
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            name: trainer_of(args, model, tokenizer, examples, pairs, s, Path(tmp) / str(i))
            for i, (name, s) in enumerate(SETTINGS.items())
        }
        names = list(trainers)
        for step in range(args.steps + 1):
            shift = step % len(names)
            for name in names[shift:] + names[:shift]:
                trainer = trainers[name]
                start = time.perf_counter()
                trainer.train_step(_PairLoss(pairs))
                if step:  # the first step warms up
                    times[name].append(time.perf_counter() - start)
        report(args, trainers, times)


def report(args, trainers: dict, times: dict) -> None:
    print(
        f"model: {'tiny' if args.tiny else args.model}; threads {args.threads}; {args.steps} steps per setting"
    )
    print(
        f"{'setting':<13} {'s/step':>7} {'examples/s':>10} {'tokens/fwd':>10} {'padding':>8} {'vs today':>8}"
    )
    today = statistics.median(times["today 8x2"])
    for name, trainer in trainers.items():
        seconds = statistics.median(times[name])
        share, per_forward = padding(trainer, args.steps + 1)
        examples = trainer.config.micro_batch * trainer.config.grad_accum
        print(
            f"{name:<13} {seconds:>7.2f} {examples / seconds:>10.2f} {per_forward:>10.0f} "
            f"{100 * share:>7.1f}% {today / seconds:>8.2f}"
        )
    best = max((n for n in trainers if n != "today 8x2"), key=lambda n: -statistics.median(times[n]))
    ratio = today / statistics.median(times[best])
    print(
        f"best: {best}, examples/s vs today = {ratio:.2f} (target >= {TARGET}: {'ok' if ratio >= TARGET else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
