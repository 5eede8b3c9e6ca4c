"""`lora-flow`: dynamic token-level fusion of per-pair LoRAs (Wang et al., ACL 2024, "LoRA-Flow:
Dynamic LoRA Fusion for Large Language Models in Generative Tasks"): Table 1's LoRA-Flow.

Two phases. First the per-pair LoRAs are trained as the -M-i ablation (`prerequisite` -> "M-i": one
randomly initialised LoRA of rank r_gen + r_spe per pair, no general LoRA), which the runner hands over
as `prior`. Then the LoRAs and the base are frozen and only the fusion gates train
(adapters/lora_fusion.py): per decoder layer, w = softmax(W_gate x) + b from the hidden state entering
the layer, one weight per LoRA per token, shared by the layer's projections (the paper's layer-level
gate, its best variant).

Official code followed: thunlp/LoRAFlow @ 74c3826 (BMTrain / ModelCenter):
  - train/ModelCenter/model_center/layer/blocks.py:465-468: the gate of each layer, W_gate a
    `Linear(..., cps = 3)`, which linear.py:59-65 initialises to zeros, and the bias `weight_bias`,
    the constant [-0.5, 0.5] for its k = 2 LoRAs (language, task), so each token starts at weights
    1/2 + b = (0, 1): the second LoRA alone. :563-566: w = softmax(W_gate x / T) + b, T = 1;
  - train/train.py:52-56 (only W_gate and b train), :63-66 and :289 (Adam, weight decay 0.1);
  - README.md:81 and :86-89 (lr 1e-3, the tuned value of four of its six tasks; 1e-4 for the other two).
Ours: W_gate = 0 as there; b = k values evenly spaced from -0.5 to 0.5 in pair order
(`options.gate_bias: spread`, the default), which is the code's [-0.5, 0.5] at k = 2 and for our
k = P = 4 pairs is (-1/2, -1/6, 1/6, 1/2): weights (-1/4, 1/12, 5/12, 3/4) for every token at step 0.
The code has no rule for k > 2; it draws nothing at random (the constant is not U(-0.5, 0.5)).
`gate_bias: zero` is the first version's start (every LoRA 1/P, our old choice). The gates train at
`options.lr`, by default (null) the official 1e-3: training.lr does not apply to this phase (an lr
grid sets options.lr), while the M-i phase trains at training.lr as its own method does.

Where ours differs from the original: LoRA-Flow fuses LoRAs of different *skills* (a language LoRA and
a math or code LoRA) for one new task; here the LoRAs are the per-pair ones and the task is every pair
at once, so at inference every pair's LoRA is available to every sample and the gate alone decides
(no routing by the pair: `route` is None). Its LoRAs are rank 64 on LLaMA-2-7B, trained before;
ours are M-i's. Training is the shared trainer's (AdamW, its schedule), not the code's BMTrain
optimizer (betas 0.9 / 0.95). The gates are tiny: L P (d + 1) parameters (Qwen2.5-0.5B, 4 pairs:
24 x 4 x 897 = 86,112), so the `lora` section's budget is spent by the M-i phase, which
`trainable_parameters` does not count.

Checkpoints hold the gates (safetensors + JSON manifest); the export is self-contained: the gates and
the frozen LoRAs (scalings folded into B) in `lora_flow.safetensors` plus `lora_flow.json`, loaded onto
the base model by `load_lora_flow`. PEFT cannot express token-level gates: export_format "safetensors".
The trained function is run unmerged (`merge` is ignored: the weights differ per token).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mlas_lora.errors import MlasLoraError
from mlas_lora.methods.base import (
    Student,
    Unrouted,
    copy_saved,
    count_trainable,
    method_options,
    options_problems,
    student_key,
)

GATES = "gates.safetensors"
MANIFEST = "lora_flow.json"
EXPORT = "lora_flow.safetensors"
FORMAT = "mlas-lora-lora-flow/1"
GATE_BIASES = ("spread", "zero")
OFFICIAL_LR = 1e-3
"""README.md:81 and :86-89 of the official code."""


@dataclass
class LoraFlowOptions:
    """LoRA-Flow's settings (a system's `options:` section); the defaults are the official code's."""

    gate_bias: str = "spread"
    """b at the start: 'spread' (k values evenly from -0.5 to 0.5: the code's [-0.5, 0.5] at k = 2) or
    'zero' (every LoRA weighted 1/k)."""
    lr: float | None = None
    """The gates' learning rate; None = the official 1e-3 (training.lr does not apply to them)."""

    def problems(self) -> list[str]:
        out = []
        if self.gate_bias not in GATE_BIASES:
            out.append(f"options.gate_bias: {self.gate_bias!r} (known: {', '.join(GATE_BIASES)})")
        if self.lr is not None and self.lr <= 0:
            out.append(f"options.lr must be > 0 (or null: the official {OFFICIAL_LR}), got {self.lr}")
        return out


def initial_gate_bias(n_loras: int, rule: str) -> torch.Tensor:
    """b of every layer's gate at the start (`LoraFlowOptions.gate_bias`)."""
    if rule == "zero" or n_loras == 1:
        return torch.zeros(n_loras)
    return torch.linspace(-0.5, 0.5, n_loras)


def fuse_routed(routed):
    """A LoRAFlowModel over the base of a trained routed student (M-i), its LoRAs frozen as buffers.

    The routed projections are put back to their plain nn.Linear first; each pair's whole update
    (`pair_update`: scalings and any general LoRA or residual reference folded in) becomes one LoRA.
    """
    from mlas_lora.adapters.lora_fusion import attach_lora_fusion
    from mlas_lora.models.arch import PROJECTION_PATHS, decoder_layers

    pairs, blocks, loras = routed.lora_config.pairs, decoder_layers(routed.model), {}
    for (i, proj), layer in routed.routed_layers().items():
        updates = [layer.pair_update(pair) for pair in pairs]
        loras[(i, proj)] = torch.cat([a for _, a in updates]), torch.cat([b for b, _ in updates], dim=1)
        parent, _, attr = PROJECTION_PATHS[proj].rpartition(".")
        setattr(blocks[i].get_submodule(parent), attr, layer.base)
    rank = next(iter(loras.values()))[0].shape[0] // len(pairs)
    return attach_lora_fusion(routed.model, pairs, rank, loras)


def _manifest(flow, **extra) -> dict:
    """What the gates and LoRAs were built for: pairs (gate order), rank, layers, targets, hidden size."""
    return {
        "format": FORMAT,
        "pairs": list(flow.pairs),
        "rank": flow.rank,
        "layers": len(flow.gates),
        "targets": list(flow.targets),
        "hidden": flow.config.hidden_size,
        **extra,
    }


def _read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MlasLoraError(f"{path}: no LoRA-Flow manifest (expected a folder written by lora-flow)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise MlasLoraError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _copy_gates(flow, tensors: dict[str, torch.Tensor], where: Path) -> None:
    saved = {k: v for k, v in tensors.items() if k.startswith("gate.")}
    copy_saved(flow.gate_state_dict(), saved, where, f"the model's gates ({len(flow.gates)} layers)")


def load_lora_flow(model, folder):
    """Attach an exported LoRA-Flow (`lora_flow.safetensors` + `lora_flow.json`) to a base causal LM."""
    from safetensors.torch import load_file

    from mlas_lora.adapters.lora_fusion import attach_lora_fusion

    manifest, tensors = _read_manifest(folder), load_file(str(Path(folder) / EXPORT))
    loras = {
        (i, p): (tensors[f"lora.{i}.{p}.A"], tensors[f"lora.{i}.{p}.B"])
        for i in range(manifest["layers"])
        for p in manifest["targets"]
    }
    flow = attach_lora_fusion(model, manifest["pairs"], manifest["rank"], loras)
    _copy_gates(flow, tensors, Path(folder) / EXPORT)
    return flow.eval()


class LoraFlow(Unrouted):
    name = "lora-flow"
    trains = True
    export_format = "safetensors"

    def problems(self, config) -> list[str]:
        return options_problems(LoraFlowOptions, config)

    def prerequisite(self, config) -> str:
        return "M-i"

    def needs_transfer(self, config) -> bool:
        return False

    def train_key(self, config, inputs: dict) -> dict:
        """The gates read the data, the training settings (lr: `training_config`), their start and the
        M-i LoRAs (`inputs["prior"]`)."""
        gate_bias = method_options(LoraFlowOptions, config).gate_bias
        return student_key(
            self.name, config, training=self.training_config(config), gate_bias=gate_bias, **inputs
        )

    def training_config(self, config):
        """config.training at options.lr, or at the official 1e-3 when that is null."""
        lr = method_options(LoraFlowOptions, config).lr
        return dataclasses.replace(config.training, lr=OFFICIAL_LR if lr is None else lr)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.adapters.routed_lora import RoutedLoRAModel

        if prior is None or not isinstance(prior.model, RoutedLoRAModel):
            raise MlasLoraError("lora-flow: build needs the trained M-i student as `prior`")
        if list(prior.model.lora_config.pairs) != list(pairs):
            raise MlasLoraError(
                f"lora-flow: the M-i LoRAs are for {prior.model.lora_config.pairs}, not {pairs}"
            )
        flow = fuse_routed(prior.model)
        bias = initial_gate_bias(len(pairs), method_options(LoraFlowOptions, config).gate_bias)
        with torch.no_grad():
            for gate in flow.gates:
                gate.bias.copy_(bias)
        return Student(flow, prior.tokenizer)

    def update_norms(self, student):
        """Nothing: the update of a projection differs per token (its gate), so no ||Delta W|| exists."""
        return lambda: {}

    def save(self, student, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in student.model.gate_state_dict().items()}
        save_file(tensors, str(path / GATES), metadata={"format": "pt"})
        (path / MANIFEST).write_text(json.dumps(_manifest(student.model), indent=2) + "\n")

    def load(self, student, path: Path) -> None:
        from safetensors.torch import load_file

        manifest = _read_manifest(path)
        if manifest != _manifest(student.model):
            raise MlasLoraError(f"{Path(path) / MANIFEST}: {manifest} does not match the model's")
        _copy_gates(student.model, load_file(str(Path(path) / GATES)), Path(path) / GATES)

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        """Self-contained: gates and frozen LoRAs, so `load_lora_flow` needs only the base model."""
        from safetensors.torch import save_file

        from mlas_lora.models.loading import base_model_id
        from mlas_lora.stage_files import fresh_dir

        fresh_dir(folder)
        flow = student.model
        tensors = {**flow.gate_state_dict(), **flow.lora_state_dict()}
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(Path(folder) / EXPORT), metadata={"format": "pt"})
        manifest = _manifest(flow, base_model_name_or_path=base_model_id(config.models.student))
        (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    def trainable_parameters(self, student) -> int:
        """The gates only: L P (hidden + 1) (the M-i LoRAs are frozen here)."""
        return count_trainable(student.model)


METHODS = (LoraFlow(),)
