"""Scoring a teacher larger than one device: a model placed by `device_map` (layers on several GPUs,
on the CPU or on disk, `models.loading.load_model(..., max_memory=...)`).

Accelerate runs such a model through hooks: each placed block moves its inputs to its execution
device, and an offloaded block loads its weights there for its forward and drops them after. The
awareness taps are ordinary forward hooks and tensor hooks, so they fire on offloaded blocks as on
resident ones; two things differ, and are handled here:

- where the inputs go: the embedding's weight may sit on `meta` (offloaded), so the batch goes to
  accelerate's main device, where offloaded blocks run (`input_device`);
- what backward holds: a linear layer saves its weight for the activation gradient, so every
  offloaded weight loaded for the forward would stay on the GPU until backward and the memory cap
  would hold for the forward only (`saved_weights_on_host`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

OFFLOADED = ("cpu", "disk")


def input_device(model) -> torch.device:
    """Where the token ids go: the embedding's device, or, for a model placed by `device_map`, the
    first device that is not `cpu` / `disk` (accelerate's main device), else the CPU."""
    placement = getattr(model, "hf_device_map", None)
    if not placement:
        return model.get_input_embeddings().weight.device
    on_device = [d for d in placement.values() if str(d) not in OFFLOADED]
    return torch.device(on_device[0]) if on_device else torch.device("cpu")


def _is_offloaded(model) -> bool:
    placement = getattr(model, "hf_device_map", None) or {}
    return any(str(d) in OFFLOADED for d in placement.values())


@contextlib.contextmanager
def saved_weights_on_host(model) -> Iterator[bool]:
    """Keep the weights autograd saves for backward in host memory; yields whether it is active.

    Active for a model with offloaded blocks computing on an accelerator. A saved tensor that is no
    activation (no grad_fn, no grad: a frozen weight loaded for the forward) and is not a resident
    weight goes to the CPU when saved and back when its layer's backward needs it, so the device
    holds resident weights plus activations, as in the forward. Activations stay where they are.
    On the CPU there is nothing to move (an offloaded weight read from disk stays in memory until
    its backward).
    """
    if input_device(model).type == "cpu" or not _is_offloaded(model):
        yield False
        return
    resident = {
        p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type not in ("cpu", "meta")
    }

    def pack(tensor: torch.Tensor):
        weight = tensor.grad_fn is None and not tensor.requires_grad and tensor.device.type != "cpu"
        if weight and tensor.untyped_storage().data_ptr() not in resident:
            return tensor.device, tensor.to("cpu")
        return None, tensor

    def unpack(packed) -> torch.Tensor:
        device, tensor = packed
        return tensor if device is None else tensor.to(device)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield True
