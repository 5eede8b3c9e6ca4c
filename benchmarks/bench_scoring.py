"""Cost of the awareness pass (Eq. 1 + Eq. 2 hooks) against a plain pass over the same batches.

    time   awareness pass / plain forward+backward          target <= 1.15
    memory awareness pass peak RSS / inference peak RSS     target <= 1.3

"plain forward+backward" is the same target-side loss and backward with the same frozen weights
(activation gradients only, the model's own MLP and norm forwards), so the time ratio is the cost
of the hooks and of recomputing the MLP activation and the norms in backward (`scoring_mode`); a
training-style backward (weight gradients too) is timed for reference. Times are the minimum over interleaved
repeats in one process (the minimum is the least disturbed by other load on the machine). Memory
is measured in a fresh subprocess per mode: peak RSS (VmHWM, reset after loading the model so
that loading spikes do not count), and the part above the RSS of the loaded model.

The batches are synthetic: S sentences of T tokens, random ids, the second half of each sentence
as the target side.

    python benchmarks/bench_scoring.py --tiny
    python benchmarks/bench_scoring.py --model qwen2.5-coder-1.5b-instruct --sentences 8 --tokens 48
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from mlas_lora.awareness.layer_relevance import LayerRelevanceTap
from mlas_lora.awareness.neuron_awareness import NeuronAwarenessTap
from mlas_lora.awareness.scoring import (
    Batch,
    _score_batch,
    activation_gradients,
    scoring_mode,
    seed_target_loss,
)
from mlas_lora.models.arch import decoder_layers

MODES = ("score", "fwdbwd", "train", "infer")


def load(args):
    if args.tiny:
        from mlas_lora.testing.tiny import tiny_model

        return tiny_model("qwen2", "teacher").to(getattr(torch, args.dtype))
    from mlas_lora.models.loading import load_model

    return load_model(args.model, dtype=args.dtype, device="cpu")[0]  # a CPU benchmark (README)


def make_batch(model, sentences: int, tokens: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size - 10, (sentences, tokens), generator=generator)
    real = torch.ones(sentences, tokens, dtype=torch.bool)
    targets = real.clone()
    targets[:, : tokens // 2] = False
    return Batch(ids, real, targets)


def runner(model, mode: str):
    """A callable doing one pass of `mode` over the batch."""
    layers = decoder_layers(model)
    if mode == "score":
        taps = LayerRelevanceTap(layers, 1), NeuronAwarenessTap(layers, 1)

        def run(batch):
            with scoring_mode(model):
                _score_batch(model, batch, 0, *taps)

        return run
    if mode == "fwdbwd":

        def run(batch):
            with activation_gradients(model):
                seed_target_loss(model, batch).backward()

        return run
    if mode == "train":

        def run(batch):
            seed_target_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)

        return run

    def run(batch):
        with torch.inference_mode():
            seed_target_loss(model, batch)

    return run


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory(args) -> None:
    """Subprocess body: load, reset the peak, run one mode twice, print JSON with kB figures."""
    model = load(args)
    model.requires_grad_(args.measure == "train")
    batch = make_batch(model, args.sentences, args.tokens)
    run = runner(model, args.measure)
    loaded = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for _ in range(2):
        run(batch)
    print(json.dumps({"loaded_kb": loaded, "peak_kb": status_kb("VmHWM")}))


def measure_time(args) -> dict[str, float]:
    model = load(args)
    batch = make_batch(model, args.sentences, args.tokens)
    runs = {mode: runner(model, mode) for mode in MODES}
    times = {mode: [] for mode in MODES}
    for repeat in range(args.repeats + 1):
        for mode, run in runs.items():
            model.requires_grad_(mode == "train")
            start = time.perf_counter()
            run(batch)
            if repeat:  # the first round is warm-up
                times[mode].append(time.perf_counter() - start)
    return {mode: min(values) for mode, values in times.items()}


def memory_in_subprocess(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", mode, "--sentences", str(args.sentences)]
    cmd += ["--tokens", str(args.tokens), "--dtype", args.dtype, "--threads", str(args.threads)]
    cmd += ["--tiny"] if args.tiny else ["--model", args.model]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args) -> None:
    times = measure_time(args)
    memory = {mode: memory_in_subprocess(args, mode) for mode in MODES}
    name = "tiny qwen2 teacher (4 layers, hidden 64)" if args.tiny else args.model
    print(
        f"model: {name}; batch {args.sentences} x {args.tokens} tokens; dtype {args.dtype}; threads {args.threads}"
    )
    print(f"{'mode':<8} {'time s':>9} {'peak MiB':>9} {'extra MiB':>10}")
    for mode in MODES:
        peak, extra = (
            memory[mode]["peak_kb"] / 1024,
            (memory[mode]["peak_kb"] - memory[mode]["loaded_kb"]) / 1024,
        )
        print(f"{mode:<8} {times[mode]:>9.4f} {peak:>9.1f} {extra:>10.1f}")
    peak_ratio = memory["score"]["peak_kb"] / memory["infer"]["peak_kb"]
    print(f"time   score / fwdbwd = {times['score'] / times['fwdbwd']:.3f}  (target <= 1.15)")
    print(f"memory score / infer  = {peak_ratio:.3f}  (peak RSS, target <= 1.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="qwen2.5-coder-1.5b-instruct", help="registry name or checkpoint dir"
    )
    parser.add_argument("--tiny", action="store_true", help="use the in-process tiny teacher instead")
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        measure_memory(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
