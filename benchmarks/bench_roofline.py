"""How far each stage runs from this machine's limits: memory bandwidth, bf16 matmul throughput, then
decode, prefill and one training step of the student and the teacher against their bounds.

    bandwidth       a 2 GiB float32 copy (read + write) and a sum (read): GB/s
    matmul          bf16 x @ W^T at the student's projection shapes, rows M = 1, 32, 64, 512: GFLOP/s,
                    and the kernel oneDNN runs (ONEDNN_VERBOSE of one call, in a subprocess)
    decode          ms per step at batch 1/8/32/64 (a cache of `--width` tokens), against the
                    weight-streaming bound: every weight the step reads (all but an untied input
                    embedding) / read bandwidth
    prefill         tokens/s of 8 prompts x `--prompt` tokens (logits of the last position only),
                    against 2 x the weights' parameters x tokens / the matmul throughput at M = 512
    training step   the routed student (r 8 + 8, all 7 projections, 4 pairs mixed), one micro-batch
                    of 8 real training examples as the trainer builds them (bf16 autocast, target-token
                    loss, backward, AdamW): tokens/s against 4 x parameters x tokens (forward + the
                    input gradients of backward; the frozen base has no weight gradients) / the matmul
                    throughput; and the share of padding tokens in the micro-batches of the cpu budget

Each "x bound" column is measured time / bound time (1.0 = at the limit). Numbers are medians.

    python benchmarks/bench_roofline.py                      # student and teacher (~6 min)
    python benchmarks/bench_roofline.py --models student --no-training
    python benchmarks/bench_roofline.py --tiny               # smoke run, numbers meaningless
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch

STUDENT, TEACHER = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(gib: float) -> dict:
    """GB/s of a copy (bytes read + written) and of a sum (bytes read)."""
    a = torch.ones(int(gib * 2**30) // 4 // 2, dtype=torch.float32)
    b = torch.empty_like(a)
    copy = median_time(lambda: b.copy_(a), 5)
    read = median_time(lambda: a.sum(), 5)
    nbytes = a.numel() * 4
    return {"copy": 2 * nbytes / copy / 1e9, "read": nbytes / read / 1e9}


def matmul(shapes: list[tuple[int, int]], rows: list[int], repeats: int) -> dict:
    """GFLOP/s of bf16 F.linear per M (rows), summed over the shapes (a layer's projections)."""
    out = {}
    for m in rows:
        flops, seconds = 0, 0.0
        for k, n in shapes:
            x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
            seconds += median_time(lambda x=x, w=w: torch.nn.functional.linear(x, w), repeats)
            flops += 2 * m * k * n
        out[m] = flops / seconds / 1e9
    return out


def onednn_kernel() -> str:
    """The implementation oneDNN picks for a bf16 matmul of 32 x 896 x 4864 (e.g. brg_matmul:...amx)."""
    code = (
        "import torch; x = torch.randn(32, 896, dtype=torch.bfloat16); "
        "w = torch.randn(4864, 896, dtype=torch.bfloat16); torch.nn.functional.linear(x, w)"
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    text = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    found = re.findall(r"primitive,exec,cpu,matmul,([^,]+)", text)
    return found[0] if found else "not oneDNN (no verbose line)"


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return " ".join(f for f in wanted if f in flags)


def streamed_bytes(model) -> int:
    """Bytes of every weight a decode step reads: all parameters, less an untied input embedding (a
    step reads only its rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def matmul_params(model) -> int:
    """Parameters of the matmuls a prefill token runs through (the decoder layers: no embedding, no head)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    skip = {embed.data_ptr(), head.data_ptr()}
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.data_ptr() not in skip)


@torch.inference_mode()
def decode_ms(model, batch: int, width: int, steps: int) -> float:
    from mlas_lora.translation.rows import contiguous_head_input

    with contiguous_head_input(model):  # as translate() runs it (else the frozen head is copied per row)
        return _decode_ms(model, batch, width, steps)


def _decode_ms(model, batch: int, width: int, steps: int) -> float:
    from transformers import DynamicCache

    ids = torch.randint(
        4, min(1000, model.config.vocab_size), (batch, width), generator=torch.Generator().manual_seed(0)
    )
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    mask = torch.ones(batch, width, dtype=torch.long)
    times = []
    for i in range(steps + 1):
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        start = time.perf_counter()
        model(
            input_ids=ids[:, :1],
            attention_mask=mask,
            position_ids=torch.full((batch, 1), width + i),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


@torch.inference_mode()
def prefill_tokens_per_s(model, batch: int, length: int, repeats: int) -> float:
    from mlas_lora.translation.rows import contiguous_head_input

    ids = torch.randint(
        4, min(1000, model.config.vocab_size), (batch, length), generator=torch.Generator().manual_seed(1)
    )
    with contiguous_head_input(model):  # as translate() runs it (else the frozen head is copied per row)
        seconds = median_time(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeats)
    return batch * length / seconds


def training_step(name: str, tiny: bool, repeats: int) -> dict:
    """Tokens/s of one routed training step on real micro-batches, and their padding share."""
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_training import mixed_batches, routed_system, step_runner

    args = argparse.Namespace(
        model=name, tiny=tiny, dtype="auto", targets="q,k,v,o,gate,up,down", r_gen=8, r_spe=8, residual=False
    )
    pairs = ["en-cs", "en-de", "en-et", "en-fi"]
    model, params, route, tokenizer = routed_system(args, pairs)
    batches = mixed_batches(tokenizer, pairs, repeats + 1, 8, 64 if tiny else 256)
    run = step_runner(model, params, route)
    run(batches[0])
    times = [run(b) for b in batches[1:]]
    tokens = [int(b["attention_mask"].numel()) for b in batches[1:]]
    real = [int(b["attention_mask"].sum()) for b in batches[1:]]
    base = model.model if hasattr(model, "model") else model
    return {
        "tokens_per_s": sum(tokens) / sum(times),
        "real_tokens_per_s": sum(real) / sum(times),
        "seconds": statistics.median(times),
        "padding": 1 - sum(real) / sum(tokens),
        "params": matmul_params(base),
        "tokens": statistics.median(tokens),
    }


def trainer_padding(tiny: bool) -> float | None:
    """Padding share of the micro-batches the trainer builds at the cpu budget (2,000 examples per
    direction, micro-batch 8, mixed pairs, one epoch's order)."""
    from mlas_lora.data.embedded import embedded_available, load_embedded
    from mlas_lora.models.loading import load_tokenizer, resolve_source
    from mlas_lora.training.data import epoch_batches, featurize

    langs = ("cs", "de", "et", "fi")
    if tiny or not embedded_available(langs):
        return None
    pairs = [f"en-{lang}" for lang in langs]
    tokenizer = load_tokenizer(*resolve_source(STUDENT))
    examples = [e for p in pairs for e in load_embedded(p, "train", limit=2000)]
    features = featurize(tokenizer, examples, pairs, 256)
    real = padded = 0
    for batch in epoch_batches(features, 8, seed=0, epoch=0, mixed=True):
        lengths = [len(features[i].input_ids) for i in batch]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="student,teacher")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--width", type=int, default=96, help="cached tokens of the decode steps")
    parser.add_argument("--prompt", type=int, default=64, help="tokens per prefill prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-training", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads; CPU flags: {cpu_flags()}")
    print(
        f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; oneDNN bf16 matmul: {onednn_kernel()}"
    )
    bw = bandwidth(0.25 if args.tiny else 2.0)
    print(f"memory bandwidth: copy {bw['copy']:.1f} GB/s (read + write), read {bw['read']:.1f} GB/s")
    shapes = [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)]
    mm = matmul(shapes, [1, 32, 64, 512], args.repeats)
    print(
        "bf16 matmul, the student's 7 projections of a layer: "
        + ", ".join(f"M={m} {g:.0f}" for m, g in mm.items())
        + " GFLOP/s"
    )
    print()
    print(f"{'model':<8} {'stage':<14} {'measured':>16} {'bound':>16} {'x bound':>8}")
    for kind in args.models.split(","):
        report_model(kind, args, bw, mm)
    if not args.no_training:
        report_training(args, mm)


def report_model(kind: str, args, bw: dict, mm: dict) -> None:
    from mlas_lora.models.loading import load_model

    if args.tiny:
        from mlas_lora.testing.tiny import tiny_model

        model = tiny_model("qwen2", kind).to(torch.bfloat16)
    else:
        model = load_model(STUDENT if kind == "student" else TEACHER, dtype="auto", device="cpu")[0]
    model.requires_grad_(False)
    weights = streamed_bytes(model)
    bound_ms = 1000 * weights / (bw["read"] * 1e9)
    for batch in (1, 8, 32, 64):
        ms = decode_ms(model, batch, args.width, args.repeats)
        print(
            f"{kind:<8} {'decode b' + str(batch):<14} {ms:>10.1f} ms/step {bound_ms:>10.1f} ms/step "
            f"{ms / bound_ms:>8.2f}   ({batch / ms * 1000:.0f} tokens/s)"
        )
    tps = prefill_tokens_per_s(model, 8, args.prompt, args.repeats)
    bound = mm[512] * 1e9 / (2 * matmul_params(model))
    print(
        f"{kind:<8} {'prefill 8x' + str(args.prompt):<14} {tps:>11.0f} tok/s {bound:>12.0f} tok/s {bound / tps:>8.2f}"
    )
    print(f"{'':<8} (weights streamed per decode step: {weights / 1e6:.0f} MB)")
    del model


def report_training(args, mm: dict) -> None:
    step = training_step(STUDENT, args.tiny, args.repeats)
    bound = mm[512] * 1e9 / (4 * step["params"])
    print(
        f"{'student':<8} {'train step':<14} {step['tokens_per_s']:>11.0f} tok/s {bound:>12.0f} tok/s "
        f"{bound / step['tokens_per_s']:>8.2f}   (routed r 8+8, micro-batch 8, median {step['seconds']:.2f} s, "
        f"{step['tokens']:.0f} tokens; non-pad {step['real_tokens_per_s']:.0f} tok/s)"
    )
    print(f"padding share: the benchmark's micro-batches {100 * step['padding']:.1f}%", end="")
    share = trainer_padding(args.tiny)
    print("" if share is None else f"; the trainer's cpu-budget micro-batches {100 * share:.1f}%")


if __name__ == "__main__":
    main()
