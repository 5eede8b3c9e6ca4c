"""`lslo`: language-specific LoRA with gradual pruning (Cao et al., EMNLP 2024, "Exploring Intrinsic
Language-specific Subspaces in Fine-tuning Multilingual Neural Machine Translation"): Table 1's LSLo.

One LoRA per language (adapters/language_lora.py), pruned to its "intrinsic subspace".

Official setting followed: Spike0924/LSLo @ c4a6522, README.md:27-78 (the repository holds only this
README: its training command names the authors' own fairseq extension, which is not published), on
M2M-100 (12 encoder + 12 decoder layers):
  - :43 lr 3e-3 (`options.lr`, null = 3e-3: the trainer runs at it and training.lr does not apply to
    this method; an lr grid sets options.lr; `train_key` holds the lr used);
  - :69-71 rank 2 for high- and medium-resource languages, 8 for low-resource ones (`options.rank`,
    default 2: our languages cs, de, et, fi and en all have WMT-scale data; one rank for every
    language, so `rank: 8` is the low-resource setting for all);
  - :65 encoder positions q k v fc1 fc2 (`options.targets`, default q k v gate up down). Qwen2's MLP is
    gated, down(silu(gate x) ⊙ up x): gate and up together are fc1 (the projection into the MLP
    width, one fc1 of width 2 x intermediate cut in two), down is fc2; o (out_proj) is not a position
    there, so not here. The decoder's cross-attention positions (:67) have no counterpart;
  - :72-73 activation directions: the first 9 of the 24 layers are indexed by the source language,
    the other 15 (3 encoder, 12 decoder) by the target. Ours: the layers below `options.split` by the
    source, the others by the target; split defaults to 9 / 24 of the layers, rounded (9 of
    Qwen2.5-0.5B's 24);
  - :46 and :75-78 pruning from epoch 2 to epoch 10 of 15 to a final ratio 0.9 (`prune_start` 2/15,
    `prune_end` 10/15, `sparsity` 0.9; our reading: t1 and t2 are epochs, since --max-epoch is).
Qwen2.5-0.5B, 4 en-xx pairs, the defaults: 9 layers x 1 source LoRA + 15 x 4 target LoRAs, rank 2,
21,120 parameters per rank and layer on the six targets: 2,914,560 trainable parameters (about
290,000 non-zero after pruning).

Where ours differs from the original:
- Decoder-only. The original is an encoder-decoder, source-indexed in the encoder and target-indexed
  in the decoder (plus its last 3 encoder layers); here one decoder stack is cut at `split`.
- Which languages: the lower layers get a LoRA for each *source* language of the pairs, the upper
  layers one for each *target* language (4 en-xx pairs: `en` below, `cs de et fi` above). The
  original gives every language a LoRA on both sides because every language is a source and a target
  in its many-to-many data; a LoRA for a language that never occupies a side would never be trained.
- Scaling alpha_gen / r_gen, as `lora` (the original's is not published).
- Training: the shared trainer (AdamW, its schedule and loss); the original trains with Adam (0.9,
  0.98), an inverse-sqrt schedule, label smoothing 0.2 and temperature-5 sampling of pairs.
- Pruning: Zhu & Gupta's cubic schedule, each A and B matrix pruned on its own; the trainable count
  stays the dense one (pruned weights are still parameters, held at zero).
- `rank: matched` sizes the rank to MLAS-LoRA's trainable parameters at the same `lora` section
  (`matched_rank`, on options.targets): the first version's row, with lora.targets as targets and
  split = half the layers, was rank 16 for Qwen2.5-0.5B and 4 pairs at r_gen = r_spe = 8.

Checkpoints are safetensors of the factors and masks + a JSON manifest; the export is one PEFT LoRA
folder per pair (its source's LoRA below the split, its target's above: one rank-r LoRA on every
layer), which `PeftModel.from_pretrained` loads as it is. Pruned weights are stored as zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mlas_lora.adapters.budget import budget_settings, mlas_lora_parameters
from mlas_lora.config import to_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.methods.base import (
    Standalone,
    Student,
    copy_saved,
    count_trainable,
    method_options,
    options_problems,
    student_key,
)
from mlas_lora.models.arch import PROJECTIONS

MANIFEST = "lslo.json"
WEIGHTS = "lslo.safetensors"
FORMAT = "mlas-lora-lslo/1"
OFFICIAL_LR = 3e-3
OFFICIAL_RANK = 2
OFFICIAL_TARGETS = ("q", "k", "v", "gate", "up", "down")
OFFICIAL_SOURCE_LAYERS = 9 / 24
"""The README's encoder-activation-direction: 9 source-indexed layers of its 12 + 12."""


@dataclass
class LsloOptions:
    """LSLo's own settings (a system's `options:` section); the defaults are the official README's."""

    split: int | None = None
    """First decoder layer routed by the target language; None = 9 / 24 of the layers (rounded)."""
    rank: int | str = OFFICIAL_RANK
    """Rank of each language's LoRA (high / medium resource: 2, low: 8), or 'matched' (`matched_rank`)."""
    targets: list[str] = field(default_factory=lambda: list(OFFICIAL_TARGETS))
    """Projections with a LoRA: q k v and the MLP (fc1 = gate + up, fc2 = down)."""
    sparsity: float = 0.9
    """Final fraction of every A and B matrix pruned (0 = no pruning)."""
    prune_start: float = 2 / 15
    """Fraction of training where pruning starts (epoch 2 of 15)."""
    prune_end: float = 10 / 15
    """Fraction of training where `sparsity` is reached (epoch 10 of 15)."""
    lr: float | None = None
    """The trainer's learning rate; None = the official 3e-3 (training.lr does not apply)."""

    def problems(self) -> list[str]:
        out = []
        if self.split is not None and self.split < 0:
            out.append(f"options.split must be >= 0, got {self.split}")
        if self.rank != "matched" and not (isinstance(self.rank, int) and self.rank >= 1):
            out.append(f"options.rank must be an int >= 1 or 'matched', got {self.rank!r}")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            out.append(f"options.targets: {self.targets} (known: {', '.join(PROJECTIONS)})")
        if not 0.0 <= self.sparsity < 1.0:
            out.append(f"options.sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.prune_start <= self.prune_end <= 1.0:
            out.append(
                f"options: need 0 <= prune_start <= prune_end <= 1, got {self.prune_start}, {self.prune_end}"
            )
        if self.lr is not None and self.lr <= 0:
            out.append(f"options.lr must be > 0 (or null: the official {OFFICIAL_LR}), got {self.lr}")
        return out


def official_split(num_layers: int) -> int:
    """The first target-indexed layer: the official 9 source-indexed layers of 24, scaled (rounded)."""
    return round(num_layers * OFFICIAL_SOURCE_LAYERS)


def matched_rank(arch, split: int, n_sources: int, n_targets: int, targets, lora, n_pairs: int) -> int:
    """The per-language rank whose trainable count on `targets` is nearest MLAS-LoRA's at the `lora`
    section (its budget, adapters/budget.py): budget / (sum over layers of the languages there x
    sum over targets of d_in + d_out)."""
    units = split * n_sources + (arch.num_layers - split) * n_targets
    per_rank = sum(sum(arch.projection_shape(t)) for t in targets)
    return max(1, round(mlas_lora_parameters(arch, lora, n_pairs) / (units * per_rank)))


def lslo_config(config, pairs: list[str], arch):
    """The LanguageLoRAConfig of a system's config for `pairs` on a model of architecture `arch`."""
    from mlas_lora.adapters.language_lora import LanguageLoRAConfig

    options, lora = method_options(LsloOptions, config), config.lora
    split = official_split(arch.num_layers) if options.split is None else options.split
    shape = LanguageLoRAConfig(tuple(pairs), split, 1, 0.0)
    rank = options.rank
    if rank == "matched":
        sides = len(shape.sources), len(shape.target_languages)
        rank = matched_rank(arch, split, *sides, options.targets, lora, len(pairs))
    return LanguageLoRAConfig(
        tuple(pairs),
        split,
        rank,
        lora.alpha_gen / lora.r_gen,
        tuple(options.targets),
        lora.dropout,
        options.sparsity,
        options.prune_start,
        options.prune_end,
    )


class Lslo(Standalone):
    name = "lslo"
    trains = True
    export_format = "peft"

    def problems(self, config) -> list[str]:
        return options_problems(LsloOptions, config)

    def train_key(self, config, inputs: dict) -> dict:
        lora, options = config.lora, method_options(LsloOptions, config)
        sizes = {"scaling": lora.alpha_gen / lora.r_gen, "dropout": lora.dropout}
        if options.rank == "matched":
            sizes["budget"] = budget_settings(lora)
        return student_key(
            self.name, config, training=self.training_config(config), lora=sizes, options=to_dict(options)
        )

    def training_config(self, config):
        """config.training at options.lr, or at the official 3e-3 when that is null."""
        lr = method_options(LsloOptions, config).lr
        return dataclasses.replace(config.training, lr=OFFICIAL_LR if lr is None else lr)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.adapters.language_lora import attach_language_lora
        from mlas_lora.models.arch import describe
        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        torch.manual_seed(config.training.seed)
        shape = lslo_config(config, list(pairs), describe(model))
        return Student(attach_language_lora(model, shape), tokenizer)

    def route(self, student):
        return student.model.routing

    def after_step(self, student, step: int, total_steps: int) -> None:
        """Prune to the cubic schedule's sparsity and re-zero pruned weights (after every step)."""
        student.model.after_step(step, total_steps)

    def update_norms(self, student):
        """pair -> mean over projections of ||Delta W_pair|| / ||W|| (its source's or target's LoRA)."""
        from mlas_lora.adapters.update_norms import lowrank_norm

        layers = student.model.lslo_layers()
        weights = {key: float(layer.base.weight.detach().double().norm()) for key, layer in layers.items()}

        def norms() -> dict[str, float]:
            out = {}
            for pair in student.model.lslo_config.pairs:
                updates = student.model.pair_update(pair)
                out[pair] = sum(lowrank_norm(*updates[k]) / weights[k] for k in layers) / len(layers)
            return out

        return norms

    def save(self, student, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in student.model.lslo_state_dict().items()}
        save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
        manifest = {"format": FORMAT, "config": student.model.lslo_config.to_dict(), "tensors": len(tensors)}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    @torch.no_grad()
    def load(self, student, path: Path) -> None:
        from safetensors.torch import load_file

        from mlas_lora.adapters.language_lora import LanguageLoRAConfig

        manifest = json.loads((Path(path) / MANIFEST).read_text())
        if (
            manifest.get("format") != FORMAT
            or LanguageLoRAConfig.from_dict(manifest["config"]) != student.model.lslo_config
        ):
            raise MlasLoraError(
                f"{Path(path) / MANIFEST}: saved {manifest.get('format')} {manifest.get('config')} does not "
                f"match the model's {FORMAT} {student.model.lslo_config.to_dict()}"
            )
        where = Path(path) / WEIGHTS
        copy_saved(student.model.lslo_state_dict(), load_file(str(where)), where, "the model's LSLo layers")

    def for_evaluation(self, student, merge: str) -> Student:
        student.model.eval()
        return student

    def decode_scope(self, student, examples, merge: str):
        """Routed and unmerged: the trained function (no merged mode; `merge` is ignored)."""
        return contextlib.nullcontext(), student.model.routing

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        from mlas_lora.models.loading import base_model_id
        from mlas_lora.stage_files import fresh_dir

        fresh_dir(folder)
        export_pair_adapters(student.model, folder, base_model_id(config.models.student))
        return folder

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


def export_pair_adapters(lslo, folder: Path, base_model: str) -> dict[str, Path]:
    """One PEFT LoRA folder per pair (scaling folded into B, lora_alpha == r); returns {pair: folder}."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from mlas_lora.adapters.export import serving_rank
    from mlas_lora.adapters.language_lora import LanguageLoRALinear

    names = {id(m): n for n, m in lslo.model.named_modules() if isinstance(m, LanguageLoRALinear)}
    layers, rank = lslo.lslo_layers(), serving_rank(lslo.lslo_config.rank)
    folders = {}
    for pair in lslo.lslo_config.pairs:
        tensors = {}
        for key, (b, a) in lslo.pair_update(pair).items():
            prefix, extra = f"base_model.model.{names[id(layers[key])]}", rank - a.shape[0]
            tensors[f"{prefix}.lora_A.weight"] = F.pad(a, (0, 0, 0, extra)).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = F.pad(b, (0, extra)).contiguous()
        folders[pair] = Path(folder) / pair
        folders[pair].mkdir(parents=True, exist_ok=True)
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=sorted({n.rsplit(".", 1)[-1] for n in names.values()}),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        ).save_pretrained(str(folders[pair]))
        save_file(tensors, str(folders[pair] / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folders


METHODS = (Lslo(),)
