"""`lslo`: language-specific LoRA with gradual pruning (Cao et al., EMNLP 2024, "Exploring Intrinsic
Language-specific Subspaces in Fine-tuning Multilingual Neural Machine Translation"): Table 1's LSLo.

One LoRA per language (adapters/language_lora.py). Where ours differs from the original:

- Decoder-only. The original adds LSLo to an encoder-decoder (M2M-100), source-indexed in the encoder
  and target-indexed in the decoder. Here the layers below `split` play the encoder's role and are
  routed by the source language, the others by the target language; `split` defaults to half the
  layers (the lower half of a decoder-only LM reads the source, the upper half writes the target).
  The paper's architecture search over which layers are source- or target-indexed is not run.
- Which languages: the lower layers get a LoRA for each *source* language of the pairs, the upper
  layers one for each *target* language (4 en-xx pairs: `en` below, `cs de et fi` above). The
  original gives every language a LoRA on both sides because every language is a source and a target
  in its many-to-many data; a LoRA for a language that never occupies a side would never be trained.
- Rank: chosen so the trainable parameters equal MLAS-LoRA's at the same `lora` section, which trains
  per layer and projection a rank of r_gen + P r_spe (general + P pairs), here spread over the
  languages of each side: rank = L (r_gen + P r_spe) / (split n_src + (L - split) n_tgt)
  (`matched_rank`). 4 en-xx pairs, r_gen = r_spe = 8, 24 layers, split 12: 24 x 40 / (12 + 48) = 16,
  exactly MLAS-LoRA's count; `options.rank` overrides it. Scaling alpha_gen / r_gen, as `lora`.
- Pruning: one final sparsity for every language, 0.9 by default (our reading of the paper's setting
  for high- and medium-resource languages, which it prunes hardest: all our languages have WMT-scale
  data), reached by Zhu & Gupta's cubic schedule between prune_start = 0.1 and prune_end = 0.7 of
  training (our choice: the last 30% of steps recover at the final sparsity). Every A and B matrix
  is pruned on its own. The trainable count stays the dense one (pruned weights are still parameters,
  held at zero); about (1 - sparsity) of it is non-zero at the end.

Checkpoints are safetensors of the factors and masks + a JSON manifest; the export is one PEFT LoRA
folder per pair (its source's LoRA below the split, its target's above: one rank-r LoRA on every
layer), which `PeftModel.from_pretrained` loads as it is. Pruned weights are stored as zeros.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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

MANIFEST = "lslo.json"
WEIGHTS = "lslo.safetensors"
FORMAT = "mlas-lora-lslo/1"


@dataclass
class LsloOptions:
    """LSLo's own settings (a system's `options:` section)."""

    split: int | None = None
    """First decoder layer routed by the target language; None = half the layers (rounded down)."""
    rank: int | None = None
    """Rank of each language's LoRA; None = MLAS-LoRA's trainable parameters (`matched_rank`)."""
    sparsity: float = 0.9
    """Final fraction of every A and B matrix pruned (0 = no pruning)."""
    prune_start: float = 0.1
    """Fraction of training where pruning starts."""
    prune_end: float = 0.7
    """Fraction of training where `sparsity` is reached."""

    def problems(self) -> list[str]:
        out = []
        if self.split is not None and self.split < 0:
            out.append(f"options.split must be >= 0, got {self.split}")
        if self.rank is not None and self.rank < 1:
            out.append(f"options.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.sparsity < 1.0:
            out.append(f"options.sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.prune_start <= self.prune_end <= 1.0:
            out.append(
                f"options: need 0 <= prune_start <= prune_end <= 1, got {self.prune_start}, {self.prune_end}"
            )
        return out


def matched_rank(
    num_layers: int, split: int, n_sources: int, n_targets: int, r_gen: int, r_spe: int, n_pairs: int
) -> int:
    """The per-language rank whose parameter count is nearest MLAS-LoRA's (module docstring)."""
    units = split * n_sources + (num_layers - split) * n_targets
    return max(1, round(num_layers * (r_gen + n_pairs * r_spe) / units))


def lslo_config(config, pairs: list[str], num_layers: int):
    """The LanguageLoRAConfig of a system's config for `pairs` on a model of `num_layers` layers."""
    from mlas_lora.adapters.language_lora import LanguageLoRAConfig

    options, lora = method_options(LsloOptions, config), config.lora
    split = num_layers // 2 if options.split is None else options.split
    shape = LanguageLoRAConfig(tuple(pairs), split, 1, 0.0)
    rank = options.rank or matched_rank(
        num_layers, split, len(shape.sources), len(shape.target_languages), lora.r_gen, lora.r_spe, len(pairs)
    )
    return LanguageLoRAConfig(
        tuple(pairs),
        split,
        rank,
        lora.alpha_gen / lora.r_gen,
        tuple(lora.targets),
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
        lora = config.lora
        sizes = {
            "r_gen": lora.r_gen,
            "r_spe": lora.r_spe,
            "alpha_gen": lora.alpha_gen,
            "dropout": lora.dropout,
            "targets": list(lora.targets),
        }
        return student_key(
            self.name, config, lora=sizes, options=to_dict(method_options(LsloOptions, config))
        )

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.adapters.language_lora import attach_language_lora
        from mlas_lora.models.arch import decoder_layers
        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        torch.manual_seed(config.training.seed)
        shape = lslo_config(config, list(pairs), len(decoder_layers(model)))
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
