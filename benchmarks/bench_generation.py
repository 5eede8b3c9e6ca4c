"""Generation speed of the routed student (Eq. 9) on a mixed-pair batch, against PEFT multi-adapter serving.

    tokens/s   routed model / PEFT mixed-adapter generate(adapter_names=...)   target >= 1.0
    tokens/s   routed model / base model without adapters                     (reported, no target)

The batch holds `--per-pair` real test segments of every pair (the embedded corpus, prompted as
translation does). The routed student gets non-zero LoRA factors (B is zero at init, which would
hide nothing in the timing but makes the agreement check below vacuous), is exported with
`export_peft_adapters`, and the per-pair adapter folders are loaded into PEFT, one adapter name
per pair; PEFT routes each row by `adapter_names`. Decoding is greedy with min_new_tokens =
max_new_tokens, so every row of every system generates the same number of tokens. The three systems
run interleaved (rotating which goes first) after a warm-up round; the report gives the median
tokens/s of each and the ratios of the medians, plus the share of generated tokens on which the
routed model and PEFT agree (they compute the same function; bf16 rounding may flip a few argmaxes).

    python benchmarks/bench_generation.py --tiny
    python benchmarks/bench_generation.py                    # the embedded 0.5B student
    python benchmarks/bench_generation.py --repeats 2 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_training import common_arguments, load_base, pair_examples

from mlas_lora.adapters.export import export_peft_adapters
from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTIONS
from mlas_lora.prompting import build_prompt, prompt_ids
from mlas_lora.translation.generate import contiguous_head_input

TARGET = 1.0


def prompt_batch(tokenizer, pairs: list[str], per_pair: int) -> tuple[dict, list[str]]:
    """Left-padded prompts of `per_pair` test segments of every pair, and each row's pair."""
    by_pair = pair_examples(pairs, per_pair, "test")
    rows = [(p, by_pair[p][k]) for k in range(per_pair) for p in pairs]
    ids = [prompt_ids(tokenizer, build_prompt(tokenizer, e.src_lang, e.tgt_lang, e.source)) for _, e in rows]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    return {"input_ids": input_ids, "attention_mask": mask}, [p for p, _ in rows]


def routed_student(args, pairs: list[str]):
    """The routed student with small random factors, as after some training."""
    model, tokenizer = load_base(args)
    targets = [t for t in PROJECTIONS if t in args.targets.split(",")]
    routed = attach_routed_lora(model, pairs, targets, args.r_gen, args.r_spe, 16.0, 16.0).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in routed.routed_layers().values():
            for block in (layer.general, *layer.specific.values()):
                block.B.copy_(torch.randn(block.B.shape, generator=generator) * args.b_std)
    return routed, tokenizer


def peft_mixed(args, routed, pairs: list[str], folder: Path):
    """PeftModel holding every pair's exported adapter under the pair's name."""
    from peft import PeftModel

    paths = export_peft_adapters(routed, folder, args.model)
    base, _ = load_base(args)
    peft = PeftModel.from_pretrained(base, str(paths[pairs[0]]), adapter_name=pairs[0])
    for pair in pairs[1:]:
        peft.load_adapter(str(paths[pair]), adapter_name=pair)
    return peft.eval()


def generator(model, batch: dict, new_tokens: int, pad_id: int, **extra):
    """A callable running one greedy generate of exactly `new_tokens` per row; returns (seconds, ids)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)

    def run():
        start = time.perf_counter()
        with torch.inference_mode(), contiguous_head_input(model):
            out = model.generate(**batch, **kwargs, **extra)
        elapsed = time.perf_counter() - start
        generated = out[:, batch["input_ids"].shape[1] :]
        if generated.shape[1] != new_tokens:
            raise MlasLoraError(f"generate stopped after {generated.shape[1]} of {new_tokens} new tokens")
        return elapsed, generated

    return run


def routed_generator(routed, row_pairs, *args):
    run = generator(routed, *args)

    def routed_run():
        with routed.routing(row_pairs):
            return run()

    return routed_run


def interleaved(runs: dict, repeats: int, warmup: int) -> tuple[dict[str, list[float]], dict]:
    """Rotate which system goes first each round; drop the first `warmup` rounds; keep the last outputs."""
    times, outputs = {name: [] for name in runs}, {}
    names = list(runs)
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, outputs[name] = runs[name]()
            if i >= warmup:
                times[name].append(elapsed)
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--per-pair", type=int, default=2, help="segments of each pair in the batch")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per row")
    parser.add_argument("--b-std", type=float, default=0.01, help="std of the random LoRA B factors")
    parser.add_argument("--repeats", type=int, default=4, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: bf16 where the CPU has it)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = args.pairs.split(",")

    routed, tokenizer = routed_student(args, pairs)
    batch, row_pairs = prompt_batch(tokenizer, pairs, args.per_pair)
    common = (batch, args.new_tokens, tokenizer.pad_token_id or 0)
    with tempfile.TemporaryDirectory() as folder:
        peft = peft_mixed(args, routed, pairs, Path(folder))
    base, _ = load_base(args)
    runs = {
        "routed": routed_generator(routed, row_pairs, *common),
        "peft": generator(peft, *common, adapter_names=row_pairs),
        "base": generator(base, *common),
    }
    times, outputs = interleaved(runs, args.repeats, args.warmup)
    report(args, pairs, batch, times, outputs)


def report(args, pairs, batch, times, outputs) -> None:
    rows, width = batch["input_ids"].shape
    name = "tiny qwen2 student (2 layers, hidden 32)" if args.tiny else args.model
    print(
        f"model: {name}; threads {args.threads}; pairs {','.join(pairs)}; LoRA r {args.r_gen} + {args.r_spe}"
    )
    print(
        f"batch {rows} rows ({args.per_pair} per pair), prompt width {width}, {args.new_tokens} new tokens "
        f"per row (greedy); {args.warmup} warm-up + {args.repeats} measured rounds, interleaved"
    )
    speed = {n: rows * args.new_tokens / statistics.median(t) for n, t in times.items()}
    print(f"{'system':<30} {'tokens/s':>9}")
    labels = {"routed": "routed student", "peft": "peft adapter_names (mixed)", "base": "base, no adapters"}
    for n, label in labels.items():
        print(f"{label:<30} {speed[n]:>9.1f}")
    ratio = speed["routed"] / speed["peft"]
    verdict = "ok" if ratio >= TARGET else "MISSED"
    print(f"tokens/s routed / peft = {ratio:.3f}  (target >= {TARGET:.1f}: {verdict})")
    print(f"tokens/s routed / base = {speed['routed'] / speed['base']:.3f}  (no target)")
    agree = (outputs["routed"] == outputs["peft"]).float().mean().item()
    print(f"routed and peft agree on {agree:.1%} of generated tokens")


if __name__ == "__main__":
    main()
