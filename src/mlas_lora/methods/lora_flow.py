"""`lora-flow`: dynamic token-level fusion of per-pair LoRAs (Wang et al., ACL 2024, "LoRA-Flow:
Dynamic LoRA Fusion for Large Language Models in Generative Tasks"): Table 1's LoRA-Flow.

Two phases. First the per-pair LoRAs are trained as the -M-i ablation (`prerequisite` -> "M-i": one
randomly initialised LoRA of rank r_gen + r_spe per pair, no general LoRA), which the runner hands over
as `prior`. Then the LoRAs and the base are frozen and only the fusion gates train
(adapters/lora_fusion.py): per decoder layer, w = softmax(W_gate x) + b from the hidden state entering
the layer, one weight per LoRA per token, shared by the layer's projections (the paper's layer-level
gate, its best variant).

Where ours differs from the original: LoRA-Flow fuses LoRAs of different *skills* (a language LoRA and
a math or code LoRA) for one new task; here the LoRAs are the per-pair ones and the task is every pair
at once, so at inference every pair's LoRA is available to every sample and the gate alone decides
(no routing by the pair: `route` is None). The gate starts at W_gate = 0, b = 0, i.e. every LoRA
weighted 1/P for every token (our choice: uniform, the least informed start; the paper's gate is
trained from its own initialisation on a few hundred examples). The gates are tiny: L P (d + 1)
parameters (Qwen2.5-0.5B, 4 pairs: 24 x 4 x 897 = 86,112), so the `lora` section's budget is spent
by the M-i phase, which `trainable_parameters` does not count.

Checkpoints hold the gates (safetensors + JSON manifest); the export is self-contained: the gates and
the frozen LoRAs (scalings folded into B) in `lora_flow.safetensors` plus `lora_flow.json`, loaded onto
the base model by `load_lora_flow`. PEFT cannot express token-level gates: export_format "safetensors".
The trained function is run unmerged (`merge` is ignored: the weights differ per token).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlas_lora.errors import MlasLoraError
from mlas_lora.methods.base import Student, Unrouted, copy_saved, count_trainable, student_key

GATES = "gates.safetensors"
MANIFEST = "lora_flow.json"
EXPORT = "lora_flow.safetensors"
FORMAT = "mlas-lora-lora-flow/1"


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
        return [f"lora-flow takes no options, got {sorted(config.options)}"] if config.options else []

    def prerequisite(self, config) -> str:
        return "M-i"

    def needs_transfer(self, config) -> bool:
        return False

    def train_key(self, config, inputs: dict) -> dict:
        """The gates read the data, the training settings and the M-i LoRAs (`inputs["prior"]`)."""
        return student_key(self.name, config, **inputs)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.adapters.routed_lora import RoutedLoRAModel

        if prior is None or not isinstance(prior.model, RoutedLoRAModel):
            raise MlasLoraError("lora-flow: build needs the trained M-i student as `prior`")
        if list(prior.model.lora_config.pairs) != list(pairs):
            raise MlasLoraError(
                f"lora-flow: the M-i LoRAs are for {prior.model.lora_config.pairs}, not {pairs}"
            )
        return Student(fuse_routed(prior.model), prior.tokenizer)

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
