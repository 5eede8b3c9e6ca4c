"""`full-ft`: full fine-tuning, every student weight trained: Table 1's full-parameter row.

The MLAS-LoRA paper reports full fine-tuning below the 0-shot student on xx-en; it is the reference
for what the PEFT methods save. Same data, steps and schedule as the other methods; differences:

- learning rate `options.lr_scale` x training.lr (default 0.1: 1e-5 at the paper's 1e-4), since
  updating every weight at a PEFT learning rate moves the model far more. The trainer gets this
  through the `training_config` hook (pipeline.train_stage); `train_key` holds the scaled lr.
- weights kept in float32 (`options.weights_dtype: float32`, the default) whatever models.dtype says:
  an AdamW step of about lr = 1e-5 on a weight of 0.03 is below half the spacing of bfloat16 there
  (6e-5), so a bf16 model would round most updates away. The trainer then computes in float32 too
  (it autocasts bf16 models only): slower. `model` keeps models.dtype (bf16 weights and autocast).
- the layer norms and the (tied) embeddings are trained too: "every weight".

Checkpoints: one `model.safetensors` holding every parameter once (tied weights once), no pickle;
for Qwen2.5-0.5B that is 494,032,768 parameters = 1.98 GB in float32 (0.99 GB with weights_dtype:
model in bf16) per checkpoint, beside the trainer's training_state.pt (AdamW's two moments: twice as
much again). Every saved step keeps its own copy, so set training.checkpoint_every with that in
mind. Export: the full model folder (`save_pretrained`, transformers format, safetensors) with its
tokenizer. `update_norms` gives mean ||W - W0|| / ||W0|| over the seven projections of every layer,
which holds a copy of those weights (1.43 GB for Qwen2.5-0.5B in float32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mlas_lora.methods.base import (
    Standalone,
    Student,
    Unrouted,
    copy_saved,
    count_trainable,
    method_options,
    student_key,
)
from mlas_lora.stage_files import fresh_dir

WEIGHTS = "model.safetensors"
WEIGHTS_DTYPES = ("float32", "model")


@dataclass
class FullFtOptions:
    lr_scale: float = 0.1
    """The trainer's lr is lr_scale x training.lr."""
    weights_dtype: str = "float32"
    """'float32' (trained weights in float32, the default) or 'model' (models.dtype)."""


class FullFineTuning(Standalone, Unrouted):
    name = "full-ft"
    trains = True
    export_format = "safetensors"

    def problems(self, config) -> list[str]:
        options = method_options(FullFtOptions, config)
        out = []
        if options.lr_scale <= 0:
            out.append(f"options.lr_scale must be > 0, got {options.lr_scale}")
        if options.weights_dtype not in WEIGHTS_DTYPES:
            out.append(
                f"options.weights_dtype: {options.weights_dtype!r} (known: {', '.join(WEIGHTS_DTYPES)})"
            )
        return out

    def training_config(self, config):
        """config.training with lr scaled by options.lr_scale: what the trainer runs."""
        options = method_options(FullFtOptions, config)
        return dataclasses.replace(config.training, lr=config.training.lr * options.lr_scale)

    def _dtype(self, config) -> str:
        weights = method_options(FullFtOptions, config).weights_dtype
        return config.models.dtype if weights == "model" else weights

    def train_key(self, config, inputs: dict) -> dict:
        return student_key(self.name, config, self._dtype(config), self.training_config(config))

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=self._dtype(config))
        model.requires_grad_(True)
        return Student(model, tokenizer)

    def update_norms(self, student):
        from mlas_lora.models.arch import decoder_layers, projections

        weights = [w.weight for layer in decoder_layers(student.model) for w in projections(layer).values()]
        initial = [w.detach().clone() for w in weights]

        def norms() -> dict[str, float]:
            ratios = [
                float((w.detach() - w0).double().norm() / w0.double().norm())
                for w, w0 in zip(weights, initial, strict=True)
            ]
            return {"all": sum(ratios) / len(ratios)}

        return norms

    def save(self, student, path: Path) -> None:
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in student.model.named_parameters()}
        save_file(tensors, str(Path(path) / WEIGHTS))

    def load(self, student, path: Path) -> None:
        from safetensors.torch import load_file

        where = Path(path) / WEIGHTS
        copy_saved(
            dict(student.model.named_parameters()), load_file(str(where)), where, "the student's weights"
        )

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        fresh_dir(folder)
        student.model.save_pretrained(str(folder))
        student.tokenizer.save_pretrained(str(folder))
        return folder

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


METHODS = (FullFineTuning(),)
