"""COMET (Rei et al., 2020) through `unbabel-comet`, from a checkpoint the user already has on disk.

COMET is an optional extra (`pip install mlas-lora[comet]`) and is never downloaded here: pass
`comet_model=PATH`, either a model folder as published (e.g. Unbabel/wmt22-comet-da, holding
`checkpoints/model.ckpt`) or the `.ckpt` file itself. Note that unbabel-comet builds the model's
encoder (xlm-roberta-large for wmt22-comet-da) from its Hugging Face name, so its config and
tokenizer must already be in the local Hugging Face cache when the machine is offline.
Without a checkpoint, the package, or the source sentences COMET reads, the metric is reported as
unavailable with the reason, and the other metrics go on; a checkpoint that is there but does not load
is an error (`mlas-lora evaluate` refuses any COMET it was asked for and cannot run).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.result import MetricResult, unavailable


def comet_checkpoint(model: str | os.PathLike) -> Path | None:
    """The .ckpt file of a COMET model folder or path, or None when there is none."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    candidate = path / "checkpoints" / "model.ckpt"
    return candidate if candidate.is_file() else None


def comet_signature(ckpt: Path) -> str:
    """Model name (the published folder's name) and package version, e.g. `model:wmt22-comet-da|...`."""
    name = ckpt.parent.parent.name if ckpt.name == "model.ckpt" else ckpt.stem
    return f"nrefs:1|model:{name}|scale:x100|unbabel-comet:{importlib.metadata.version('unbabel-comet')}"


def comet_available(model: str | os.PathLike | None, has_sources: bool = True) -> tuple[bool, str | None]:
    """Whether COMET can run with this checkpoint, and if not, why."""
    if model is None:
        return False, "no COMET checkpoint given (pass comet_model=PATH, e.g. a local Unbabel/wmt22-comet-da)"
    if comet_checkpoint(model) is None:
        return (
            False,
            f"no COMET checkpoint at {model} (expected a .ckpt file or a folder with checkpoints/model.ckpt)",
        )
    if importlib.util.find_spec("comet") is None:
        return False, "unbabel-comet is not installed (pip install 'mlas-lora[comet]')"
    if not has_sources:
        return False, "COMET needs the source sentences (pass sources=...)"
    return True, None


def comet_corpus(
    hypotheses: Sequence[str],
    references: Sequence[str],
    sources: Sequence[str] | None,
    model: str | os.PathLike | None,
    n_segments: int | None = None,
    batch_size: int = 16,
) -> MetricResult:
    """System-level COMET (mean of segment scores, x100), on the GPU when one is visible."""
    n = len(hypotheses) if n_segments is None else n_segments
    ok, reason = comet_available(model, has_sources=sources is not None)
    if not ok:
        return unavailable("comet", n, reason)
    import comet
    import torch

    ckpt = comet_checkpoint(model)
    try:
        scorer = comet.load_from_checkpoint(str(ckpt))
    except Exception as err:  # noqa: BLE001 - any refusal: the metric was asked for with this model
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise MlasLoraError(
            f"{ckpt}: COMET cannot load this checkpoint ({type(err).__name__}: {first})"
        ) from None
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references, strict=True)]
    prediction = scorer.predict(data, batch_size=batch_size, gpus=1 if torch.cuda.is_available() else 0)
    return MetricResult("comet", 100.0 * float(prediction.system_score), comet_signature(ckpt), n)
