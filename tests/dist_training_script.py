"""Routed LoRA training of a tiny student under a launcher; run by tests/test_scale_out.py, not collected.

    accelerate launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no tests/dist_training_script.py OUT

Trains STEPS optimizer steps in two runs, as a killed and resumed job would: STOP steps, then a
fresh model and trainer resume from the newest checkpoint and finish. Each process writes its
final adapters to OUT/rank-<index>.safetensors; checkpoints go to OUT/run/, and every call of the
trainer's save callback leaves OUT/saved-by-<rank>-step<N> behind, so the test can see who wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlas_lora.adapters.export import load_routed, save_routed
from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.data.records import Example
from mlas_lora.distributed import rank_and_size
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.trainer import Trainer

PAIRS = ["en-de", "en-fi", "en-et", "en-cs"]
EXAMPLES = (
    [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(6)]
    + [Example("en", "fi", f"cat {i}", f"kissa {i}") for i in range(6)]
    + [Example("en", "et", f"house number {i}", f"maja number {i}") for i in range(6)]
)
"""en-cs has no example: its LoRA is absent from every step and must stay bitwise as initialised."""
CONFIG = TrainingConfig(
    lr=1e-2,
    micro_batch=2,
    grad_accum=3,
    max_steps=4,
    checkpoint_every=1,
    warmup_ratio=0.0,
    weight_decay=0.1,
    mixed_pairs=False,
)
"""One pair per micro-batch and 3 micro-batches per step (two processes run 2 and 1): every step
leaves at least one pair out, some pairs are present on one process only, some only before its
`no_sync` ends; weight decay would move a pair whose gradient were zeros instead of None."""
STOP = 2


def routed_student():
    torch.manual_seed(0)
    model = attach_routed_lora(tiny_model(), PAIRS, r_gen=4, r_spe=4)
    with torch.no_grad():  # B = 0 at init would make the first step's gradient of A zero
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith(".B"):
                param.normal_(0, 0.02)
    return model


def train(out_dir: Path, stop_after: int | None = None, on_save=None):
    """(adapters, TrainResult) after training to CONFIG.max_steps (or `stop_after`), resuming."""
    model = routed_student()

    def save(path: Path) -> None:
        save_routed(model, path)
        if on_save is not None:
            on_save(path)

    trainer = Trainer(
        model, tiny_tokenizer(), EXAMPLES, PAIRS, CONFIG, out_dir, model.routing,
        save, lambda path: load_routed(model, path),
    )  # fmt: skip
    result = trainer.fit(progress=False, stop_after=stop_after)
    return model.lora_state_dict(), result


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank, size = rank_and_size()

    def mark(path: Path) -> None:
        (out / f"saved-by-{rank}-{path.parent.name.removesuffix('.tmp')}").touch()

    out.mkdir(parents=True, exist_ok=True)
    train(out / "run", stop_after=STOP, on_save=mark)
    adapters, result = train(out / "run", on_save=mark)
    save_file({k: v.contiguous() for k, v in adapters.items()}, str(out / f"rank-{rank}.safetensors"))
    (out / f"rank-{rank}.json").write_text(
        json.dumps({"size": size, "history": result.history, "loss_per_pair": result.loss_per_pair})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
