"""`lora`: one PEFT LoRA shared by every pair, randomly initialised (PEFT's default): Table 1's LoRA
row, which is also Table 2's -R-i. Rank r_gen + r_spe (what one pair's sample sees in MLAS-LoRA),
scaling alpha_gen / r_gen, the same targets, data and steps.

Options (`options:` of a system; presets `lora-total` and `pissa`):
- `rank: total`: rank r_gen + P x r_spe (P trained pairs), MLAS-LoRA's total trainable parameters in
  one shared LoRA (scaling alpha_gen / r_gen kept, so the lr moves it alike).
- `init: pissa`: PiSSA (Meng et al., NeurIPS 2024; PEFT's `init_lora_weights="pissa"`, which
  `peft/tuners/lora/layer.py` `LoraLayer.pissa_init` implements): A = sqrt(S_r) V_r^T and
  B = U_r sqrt(S_r) / scaling from the SVD of the student's own weight W, and the frozen base becomes
  W - scaling B A, so the function is W at step 0 (up to the base dtype's rounding of the residual,
  as in PEFT). Ours computes the same factors with the project's thin SVD (a wide matrix through its
  transpose: PEFT's SVD of the 896 x 4864 down projection is much slower on CPU). The export folds
  the change back onto the original base as PEFT's PiSSA conversion does (`save_pretrained(...,
  path_initial_model_for_weight_conversion=...)`: a LoRA of rank 2r), so it loads on the unmodified
  student.

Checkpoints and the export are PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`) that `PeftModel.from_pretrained` loads as they are.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mlas_lora.methods.base import (
    PeftFolders,
    Standalone,
    Student,
    count_trainable,
    method_options,
    options_problems,
    student_key,
)
from mlas_lora.models.arch import PROJECTION_PATHS

RANKS = ("per-sample", "total")
INITS = ("random", "pissa")


@dataclass
class LoraOptions:
    rank: str = "per-sample"
    """'per-sample' (r_gen + r_spe, what one sample sees in MLAS-LoRA) or 'total' (r_gen + P x r_spe)."""
    init: str = "random"
    """'random' (PEFT's default: A kaiming, B = 0) or 'pissa' (the student's own principal factors)."""

    def problems(self) -> list[str]:
        out = [f"options.rank: {self.rank!r} (known: {', '.join(RANKS)})"] if self.rank not in RANKS else []
        if self.init not in INITS:
            out.append(f"options.init: {self.init!r} (known: {', '.join(INITS)})")
        return out


def lora_rank(config) -> int:
    """The shared LoRA's rank under the system's `options.rank`."""
    lora, options = config.lora, method_options(LoraOptions, config)
    pairs = len(config.data.trained_directions) if options.rank == "total" else 1
    return lora.r_gen + pairs * lora.r_spe


def peft_config(lora, rank: int | None = None):
    """PEFT's LoraConfig for the experiment's `lora` section (rank r_gen + r_spe unless given)."""
    from peft import LoraConfig

    rank = rank or lora.r_gen + lora.r_spe
    return LoraConfig(
        r=rank,
        lora_alpha=rank * lora.alpha_gen / lora.r_gen,
        lora_dropout=lora.dropout,
        target_modules=[PROJECTION_PATHS[t].split(".")[-1] for t in lora.targets],
    )


class PeftLora(Standalone, PeftFolders):
    name = "lora"
    trains = True

    def problems(self, config) -> list[str]:
        return options_problems(LoraOptions, config)

    def train_key(self, config, inputs: dict) -> dict:
        lora, options = config.lora, method_options(LoraOptions, config)
        settings = {
            "r": lora_rank(config),
            "scaling": lora.alpha_gen / lora.r_gen,
            "dropout": lora.dropout,
            "targets": list(lora.targets),
        }
        if options.init != "random":  # a setting added later enters the key only when set
            settings["init"] = options.init
        return student_key(self.name, config, lora=settings)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from peft import get_peft_model

        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        torch.manual_seed(config.training.seed)
        peft_model = get_peft_model(
            model, peft_config(config.lora, lora_rank(config)), autocast_adapter_dtype=True
        )
        if method_options(LoraOptions, config).init == "pissa":
            pissa_init(peft_model)
        return Student(peft_model, tokenizer)

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        initial = getattr(student.model, "pissa_initial", None)
        if initial is None:
            return super().export(student, config, folder, merge)
        with tempfile.TemporaryDirectory() as tmp:  # PEFT's PiSSA conversion reads the step-0 adapter
            start = Path(tmp) / "initial"
            start.mkdir()
            from safetensors.torch import save_file

            save_file(initial, str(start / "adapter_model.safetensors"))
            return super().export(
                student, config, folder, merge, path_initial_model_for_weight_conversion=str(start)
            )

    def route(self, student):
        return None

    def update_norms(self, student):
        from mlas_lora.adapters.update_norms import peft_update_norms

        return peft_update_norms(student.model)

    def for_evaluation(self, student, merge: str) -> Student:
        """Unmerged (PEFT as trained) unless `weights`: then merged into the base weights' dtype."""
        student.model.eval()
        if merge == "weights":
            return Student(student.model.merge_and_unload(), student.tokenizer)
        return student

    def decode_scope(self, student, examples, merge: str):
        return contextlib.nullcontext(), None

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


def pissa_init(peft_model) -> None:
    """PiSSA factors for every LoRA layer of `peft_model` (PEFT's formula, our thin SVD): A = sqrt(S_r)
    V_r^T, B = U_r sqrt(S_r) / scaling, base W -> W - scaling B A. The step-0 adapter is kept on the
    model (`pissa_initial`, PEFT's state-dict names) for the export's conversion."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from mlas_lora.transfer.svd_init import thin_svd

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.lora_A:
            base = module.get_base_layer()
            rank, scaling = module.r[name], module.scaling[name]
            weight = base.weight.detach().to(torch.float32)
            u, s, vh = thin_svd(weight)
            root = torch.sqrt(s[:rank] / scaling)
            a, b = root[:, None] * vh[:rank], u[:, :rank] * root
            with torch.no_grad():
                module.lora_A[name].weight.copy_(a)
                module.lora_B[name].weight.copy_(b)
                base.weight.copy_((weight - scaling * b @ a).to(base.weight.dtype))
    initial = get_peft_model_state_dict(peft_model)
    peft_model.pissa_initial = {k: v.detach().clone().contiguous() for k, v in initial.items()}


METHODS = (PeftLora(),)
