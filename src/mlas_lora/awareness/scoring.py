"""The awareness pass: Eq. (1) layer relevance and Eq. (2) neuron awareness from one pass per batch.

For each language pair the teacher reads the pair's seed sentences in the training prompt format
(`mlas_lora.prompting.training_ids`: prompt then ` reference<eos>`, cut to `max_tokens` as training
cuts them), right-padded so that real tokens keep positions 0..n-1 exactly as when a sentence is run
alone. Eq. (1) averages over the tokens of its configured reading (`layer_relevance.READINGS`; the
default, `source`, is the paper's: the source segment inside the prompt, which cannot see the target
under causal attention); every reading is accumulated in the same pass and saved. One forward (with hooks on
the decoder layers for Eq. 1 and on the projections for Eq. 2) and one backward of the target-side
loss per batch give both scores; all weights are frozen, so backward computes activation
gradients only. Every teacher layer is scored: the layer selection needs R from the same pass and
the per-layer tensors are small.

Loss: per sentence, the mean next-token cross-entropy over its target tokens; per batch, the sum
of the sentence losses. Summing (not averaging) over the batch makes every sentence's gradients,
and so the scores, independent of batch size and of what it is batched with.

Files written by `save_awareness(scores, dir)` (read by the extraction stage):

    awareness.safetensors
        relevance           float32 [P, num_teacher_layers]      R_i(s,t), Eq. (1), configured reading
        relevance.{reading} float32 [P, num_teacher_layers]      the same for source / prompt / all
        phi.{l}.{p}.in      float32 [P, in_features]             Eq. (2), input side of projection p
        phi.{l}.{p}.out     float32 [P, out_features]            Eq. (2), output side
        for every teacher layer l and p in q, k, v, o, gate, up, down; rows follow `pairs`.
    awareness.json
        {"pairs": [...], "num_teacher_layers": N, "selected_layers": [...],
         "selection_mode": "mean" | "pair", "selection_pair": null | "en-de",
         "num_sentences": {pair: n}, "num_tokens": {pair: n}, "num_target_tokens": {pair: n},
         "relevance_reading": "source", "selected_layers_by_reading": {reading: [...]},
         "dtype": "bfloat16", "reduction": "..."}

`num_tokens` are the real tokens whose |dL/dh * h| were summed into a pair's Phi: classification
divides by them (`awareness.normalize: tokens`), so a pair whose sentences tokenise longer does not
own more neurons for that alone.

`selected_layers` are teacher layer indices in ascending order; teacher layer selected_layers[k]
maps onto student layer k.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlas_lora.awareness.layer_relevance import READINGS, LayerRelevanceTap, select_layers
from mlas_lora.awareness.neuron_awareness import NeuronAwarenessTap, phi_key
from mlas_lora.awareness.offload import input_device, saved_weights_on_host
from mlas_lora.data.records import Example
from mlas_lora.distributed import is_main_process, shard
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTIONS, decoder_layers
from mlas_lora.progress import progress_bar
from mlas_lora.prompting import PromptStyle, build_prompt, training_ids, uses_chat
from mlas_lora.stage_files import read_json, require_file, write_text_atomic
from mlas_lora.training.data import fit_to_budget, width_multiple
from mlas_lora.training.loss import TokenCrossEntropy, predicting_positions

AWARENESS_TENSORS = "awareness.safetensors"
AWARENESS_META = "awareness.json"

REDUCTION = (
    "relevance: L1 norm over hidden units of (layer output - layer input), mean over the tokens of "
    "the reading (source: the source segment in the prompt; prompt; all: prompt+target; padding "
    "excluded), mean over sentences; A_0 = embedding output. "
    "phi: |dL/dh * h| summed over sentences and real tokens; L = per-sentence mean target-token "
    "cross-entropy, summed over the batch; q/k/v and gate/up share one input score"
)


@dataclass(frozen=True)
class AwarenessScores:
    """Eq. (1) and Eq. (2) scores of one teacher over a set of language pairs."""

    pairs: list[str]
    relevance: torch.Tensor  # float32 [P, num_teacher_layers]
    phi: dict[str, torch.Tensor]  # phi_key -> float32 [P, features]
    num_sentences: dict[str, int]
    dtype: str
    selected_layers: list[int]
    selection_mode: str = "mean"
    selection_pair: str | None = None
    reduction: str = REDUCTION
    num_tokens: dict[str, int] = field(default_factory=dict)
    """Real tokens summed into each pair's Phi (prompt + target); the `tokens` normalisation's divisor."""
    num_target_tokens: dict[str, int] = field(default_factory=dict)
    relevance_reading: str = "all"
    """Which tokens `relevance` averages over (layer_relevance.READINGS); older files hold `all`."""
    relevance_by_reading: dict[str, torch.Tensor] = field(default_factory=dict)

    def selected_by_reading(self) -> dict[str, list[int]]:
        """The top-L layers (same L and mode as `selected_layers`) under every saved reading."""
        k = len(self.selected_layers)
        return {
            name: select_layers(r, k, self.selection_mode, self.selection_pair, self.pairs)
            for name, r in self.relevance_by_reading.items()
        }

    @property
    def num_teacher_layers(self) -> int:
        return int(self.relevance.shape[1])

    def phi_of(self, layer: int, proj: str, side: str) -> torch.Tensor:
        return self.phi[phi_key(layer, proj, side)]

    def with_selection(self, num_layers: int, mode: str = "mean", pair: str | None = None) -> AwarenessScores:
        """The same scores with the top-`num_layers` selection redone (see `select_layers`)."""
        chosen = select_layers(self.relevance, num_layers, mode, pair, self.pairs)
        return replace(self, selected_layers=chosen, selection_mode=mode, selection_pair=pair)


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids; `tokens` marks real tokens, `targets` the target-side tokens and
    `sources` the source segment's tokens inside the prompt (None: the whole prompt)."""

    input_ids: torch.Tensor  # long [B, T]
    tokens: torch.Tensor  # bool [B, T]
    targets: torch.Tensor  # bool [B, T]
    sources: torch.Tensor | None = None  # bool [B, T]

    def to(self, device) -> Batch:
        sources = None if self.sources is None else self.sources.to(device)
        return Batch(self.input_ids.to(device), self.tokens.to(device), self.targets.to(device), sources)

    def readings(self) -> dict[str, torch.Tensor]:
        """{reading: bool [B, T]}: the tokens each Eq. (1) reading averages over."""
        prompt = self.tokens & ~self.targets
        return {
            "source": prompt if self.sources is None else self.sources,
            "prompt": prompt,
            "all": self.tokens,
        }


@dataclass(frozen=True)
class SeedIds:
    """One seed sentence as token ids: prompt, target, and where the source sits in the prompt."""

    prompt: list[int]
    target: list[int]
    source_span: tuple[int, int]  # [start, end) in prompt positions


def source_span(
    tokenizer, prompt_text: str, source: str, prompt: list[int], style: PromptStyle
) -> tuple[int, int]:
    """[start, end) of the prompt tokens that overlap the source's characters (its last occurrence).

    Uses the tokenizer's character offsets; where it has none, or they do not reproduce `prompt`,
    the whole prompt is the span.
    """
    start_char = prompt_text.rfind(source)
    whole = (0, len(prompt))
    if start_char < 0 or not source or not getattr(tokenizer, "is_fast", False):
        return whole
    encoded = tokenizer(
        prompt_text, add_special_tokens=not uses_chat(tokenizer, style), return_offsets_mapping=True
    )
    if list(encoded["input_ids"]) != list(prompt):
        return whole
    end_char = start_char + len(source)
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end_char and b > start_char]
    return (inside[0], inside[-1] + 1) if inside else whole


def seed_ids(
    tokenizer, example: Example, max_tokens: int | None = None, style: PromptStyle | None = None
) -> SeedIds:
    """Prompt and target ids as training sees them (cut to `max_tokens` the same way), source span."""
    style = style or PromptStyle()
    prompt, target = training_ids(tokenizer, example, style)
    text = build_prompt(tokenizer, example.src_lang, example.tgt_lang, example.source, style=style)
    start, end = source_span(tokenizer, text, example.source, prompt, style)
    if max_tokens is not None:
        cut_prompt, target = fit_to_budget(prompt, target, max_tokens)
        cut = len(prompt) - len(cut_prompt)
        prompt, start, end = cut_prompt, max(0, start - cut), max(0, end - cut)
        if start >= end:
            start, end = 0, len(prompt)
    return SeedIds(prompt, target, (start, end))


def collate(
    encoded: Sequence[SeedIds | tuple[list[int], list[int]]], pad_id: int, multiple: int = 1
) -> Batch:
    """Concatenate (prompt, target) ids and right-pad them into one batch (SeedIds keep their source
    span), `multiple` tokens wide (`training.data.width_multiple`); pads are no token, target or source."""
    encoded = [e if isinstance(e, SeedIds) else SeedIds(e[0], e[1], (0, len(e[0]))) for e in encoded]
    width = max(len(e.prompt) + len(e.target) for e in encoded)
    width += -width % multiple
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    tokens = torch.zeros(len(encoded), width, dtype=torch.bool)
    targets, sources = torch.zeros_like(tokens), torch.zeros_like(tokens)
    for row, e in enumerate(encoded):
        if not e.target:
            raise MlasLoraError("a seed example has an empty target after tokenisation; Eq. (2) needs one")
        n = len(e.prompt) + len(e.target)
        ids[row, :n] = torch.tensor(e.prompt + e.target)
        tokens[row, :n] = True
        targets[row, len(e.prompt) : n] = True
        sources[row, e.source_span[0] : e.source_span[1]] = True
    return Batch(ids, tokens, targets, sources)


def pair_batches(
    tokenizer, examples: Sequence[Example], batch_size: int, max_tokens: int | None = None, multiple: int = 1
) -> list[Batch]:
    """Batches of one pair's seeds, longest first so that batches hold similar lengths (`collate`)."""
    encoded = sorted(
        (seed_ids(tokenizer, ex, max_tokens) for ex in examples),
        key=lambda e: -len(e.prompt) - len(e.target),
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [
        collate(encoded[i : i + batch_size], pad_id or 0, multiple)
        for i in range(0, len(encoded), batch_size)
    ]


def seed_target_loss(model, batch: Batch) -> torch.Tensor:
    """Sum over sentences of each sentence's mean next-token loss on its target tokens.

    This is L of Eq. (2) on a batch of seed sentences: every sentence weighs the same, unlike the
    token mean of `training.loss.target_loss`, which the student is trained on.

    Logits are computed only at the positions that predict a target token (a boolean
    `logits_to_keep`), which spares the vocabulary projection at every prompt position, and the
    cross-entropy keeps only those logits (`TokenCrossEntropy`).
    """
    predicts = predicting_positions(batch.targets)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.tokens.long(),
        use_cache=False,
        logits_to_keep=predicts,
    ).logits
    labels = batch.input_ids[:, 1:][batch.targets[:, 1:]]
    per_row = predicts.sum(1).to(torch.float32)
    weights = (1.0 / per_row)[:, None].expand_as(predicts)[predicts]
    return (TokenCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), labels) * weights).sum()


@contextlib.contextmanager
def activation_gradients(model) -> Iterator[None]:
    """Freeze every weight and make the embedding output require grad, restoring both afterwards.

    With all weights frozen nothing upstream needs a gradient, so autograd would build no graph;
    a grad-requiring embedding output is the one leaf that makes backward reach every activation
    while never materialising a weight gradient.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for param, _ in flags:
        param.requires_grad_(False)
    model.eval()
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


GATED_MLPS = frozenset({"Qwen2MLP", "LlamaMLP", "Gemma2MLP", "Gemma3MLP", "MistralMLP", "Qwen3MLP"})
"""MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (checked by a test)."""


def _act_times_up(act: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


@contextlib.contextmanager
def _instance_forwards(replacements: list[tuple[nn.Module, Callable]]) -> Iterator[int]:
    """Give each module its own forward inside the block (yields how many); class forwards after."""
    for module, forward in replacements:
        module.forward = forward
    try:
        yield len(replacements)
    finally:
        for module, _ in replacements:
            del module.forward


def _recomputed_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    forward = type(module).forward
    return lambda x: checkpoint(forward, module, x, use_reentrant=False)


def _light_mlp_forward(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        product = checkpoint(_act_times_up, mlp.act_fn, gate, up, use_reentrant=False)
        return mlp.down_proj(product)

    return forward


@contextlib.contextmanager
def recomputed_mlp_activation(model) -> Iterator[int]:
    """Let backward recompute act(gate) in each gated MLP instead of keeping it; yields how many.

    A gated MLP computes down(act(gate(x)) * up(x)). Autograd keeps gate(x) (for act's backward),
    act(gate(x)) and up(x) (for the product's), three tensors of the MLP width per token and layer,
    the largest part of what the awareness pass holds. Checkpointing the product keeps only gate(x)
    and up(x), which the neuron tap holds anyway, and recomputes act(gate(x)) in backward: the
    gradients are the same, the projections' hooks see the same tensors. Only MLPs whose forward
    is exactly that (Qwen2, Llama, Gemma2 and others with gate_proj / up_proj / down_proj / act_fn)
    are changed; the original forwards come back on exit.
    """
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    chosen = [m for m in mlps if type(m).__name__ in GATED_MLPS and "forward" not in vars(m)]
    with _instance_forwards([(mlp, _light_mlp_forward(mlp)) for mlp in chosen]) as count:
        yield count


@contextlib.contextmanager
def recomputed_norms(model) -> Iterator[int]:
    """Let backward recompute each decoder layer's RMS norms; yields how many norms were changed.

    An RMS norm computes in float32, so autograd keeps a float32 copy of its input (twice the size
    of the bfloat16 input) per norm, token and layer. Checkpointing the norm keeps its input only
    and recomputes the rest in backward; gradients are the same.
    """
    norms = [
        norm
        for layer in decoder_layers(model)
        for norm in layer.children()
        if type(norm).__name__.endswith("RMSNorm") and "forward" not in vars(norm)
    ]
    with _instance_forwards([(norm, _recomputed_forward(norm)) for norm in norms]) as count:
        yield count


@contextlib.contextmanager
def scoring_mode(model) -> Iterator[None]:
    """How the awareness pass runs the teacher: activation gradients only, MLP activation and norms
    recomputed in backward (`activation_gradients`, `recomputed_mlp_activation`, `recomputed_norms`)."""
    with activation_gradients(model), recomputed_mlp_activation(model), recomputed_norms(model):
        yield


def score_teacher(
    model,
    tokenizer,
    seeds: Mapping[str, Sequence[Example]],
    batch_size: int = 8,
    dtype: torch.dtype | None = torch.bfloat16,
    num_student_layers: int | None = None,
    progress: bool = True,
    relevance_reading: str = "source",
    max_tokens: int | None = None,
) -> AwarenessScores:
    """Run the awareness pass over every pair's seed sentences (Eq. 1 and Eq. 2, Sec. 3.1).

    `seeds` maps a pair name ("en-de") to its seed examples. `dtype` is the compute dtype; a model
    in another dtype is cast in place (None keeps the model's dtype). Scores accumulate in float32.
    `num_student_layers` sets the top-L selection by mean relevance (None keeps every layer) under
    `relevance_reading` (layer_relevance.READINGS); `max_tokens` cuts each seed as training does.

    Data-parallel under `accelerate launch` (`mlas_lora.distributed`): every process builds the same
    batches, scores every size-th one from its index, and the sums (Phi, the relevance sums and
    their sentence counts) are added up across processes before the means are taken, so each
    process returns the scores of one process scoring everything (up to float summation order).
    Token counts are counted on the full batch list. A model placed by `device_map` (offloaded
    layers) is scored as it is (`awareness.offload`).
    """
    if relevance_reading not in READINGS:
        raise MlasLoraError(f"relevance_reading must be one of {READINGS}, got {relevance_reading!r}")
    pairs = _check_seeds(seeds)
    if dtype is not None and model.dtype != dtype:
        model.to(dtype)
    layers = decoder_layers(model)
    device = input_device(model)
    batches = [
        (i, b)
        for i, pair in enumerate(pairs)
        for b in pair_batches(tokenizer, seeds[pair], batch_size, max_tokens, width_multiple(device))
    ]
    tokens = {pair: 0 for pair in pairs}
    target_tokens = dict(tokens)
    for i, b in batches:
        tokens[pairs[i]] += int(b.tokens.sum())
        target_tokens[pairs[i]] += int(b.targets.sum())
    relevance_tap = LayerRelevanceTap(layers, len(pairs), device)
    neuron_tap = NeuronAwarenessTap(layers, len(pairs), device)
    shown = progress and is_main_process()
    try:
        with scoring_mode(model), saved_weights_on_host(model):
            for pair_index, batch in progress_bar(shard(batches), desc="awareness", unit="batch", show=shown):
                _score_batch(model, batch.to(device), pair_index, relevance_tap, neuron_tap)
    finally:
        relevance_tap.remove()
        neuron_tap.remove()
    relevance_tap.sum_across_processes(READINGS)
    neuron_tap.sum_across_processes()
    by_reading = {name: relevance_tap.relevance(name) for name in READINGS}
    relevance = by_reading[relevance_reading]
    chosen = select_layers(relevance, num_student_layers or len(layers))
    return AwarenessScores(
        pairs=pairs,
        relevance=relevance,
        phi=neuron_tap.scores(),
        num_sentences={pair: len(seeds[pair]) for pair in pairs},
        dtype=str(model.dtype).removeprefix("torch."),
        selected_layers=chosen,
        num_tokens=tokens,
        num_target_tokens=target_tokens,
        relevance_reading=relevance_reading,
        relevance_by_reading=by_reading,
    )


def _score_batch(model, batch: Batch, pair_index: int, relevance_tap, neuron_tap) -> None:
    relevance_tap.start_batch(pair_index, batch.readings())
    neuron_tap.start_batch(pair_index, batch.tokens)
    try:
        seed_target_loss(model, batch).backward()
    finally:
        neuron_tap.end_batch()


def _check_seeds(seeds: Mapping[str, Sequence[Example]]) -> list[str]:
    problems = [f"pair {pair!r} has no seed sentences" for pair, examples in seeds.items() if not examples]
    for pair, examples in seeds.items():
        wrong = sorted({ex.pair for ex in examples if ex.pair != pair})
        if wrong:
            problems.append(f"pair {pair!r} holds examples of other directions: {', '.join(wrong)}")
    if not seeds:
        problems.append("no language pairs given")
    if problems:
        raise MlasLoraError("bad awareness seeds:\n  " + "\n  ".join(problems))
    return list(seeds)


def save_awareness(scores: AwarenessScores, directory: str | Path) -> Path:
    """Write awareness.safetensors and awareness.json (format in the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"relevance": scores.relevance.float().contiguous()}
    tensors.update({f"relevance.{k}": v.float().clone() for k, v in scores.relevance_by_reading.items()})
    tensors.update({key: value.float().contiguous() for key, value in scores.phi.items()})
    save_file(tensors, str(directory / AWARENESS_TENSORS))
    meta = {
        "pairs": scores.pairs,
        "num_teacher_layers": scores.num_teacher_layers,
        "selected_layers": scores.selected_layers,
        "selection_mode": scores.selection_mode,
        "selection_pair": scores.selection_pair,
        "num_sentences": scores.num_sentences,
        "num_tokens": scores.num_tokens,
        "num_target_tokens": scores.num_target_tokens,
        "relevance_reading": scores.relevance_reading,
        "selected_layers_by_reading": scores.selected_by_reading(),
        "dtype": scores.dtype,
        "reduction": scores.reduction,
    }
    write_text_atomic(directory / AWARENESS_META, json.dumps(meta, indent=2) + "\n")
    return directory


def load_awareness(directory: str | Path) -> AwarenessScores:
    """Read what `save_awareness` wrote, checking that tensors and metadata agree."""
    directory = Path(directory)
    tensor_path = require_file(directory / AWARENESS_TENSORS, "awareness")
    meta = read_json(directory / AWARENESS_META, "awareness")
    tensors = load_file(str(tensor_path))
    relevance = tensors.pop("relevance", None)
    by_reading = {k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("relevance.")}
    _check_loaded(meta, relevance, tensors, tensor_path)
    return AwarenessScores(
        pairs=list(meta["pairs"]),
        relevance=relevance,
        phi=tensors,
        num_sentences={k: int(v) for k, v in meta["num_sentences"].items()},
        dtype=meta["dtype"],
        selected_layers=[int(i) for i in meta["selected_layers"]],
        selection_mode=meta.get("selection_mode", "mean"),
        selection_pair=meta.get("selection_pair"),
        reduction=meta.get("reduction", REDUCTION),
        num_tokens={k: int(v) for k, v in meta.get("num_tokens", {}).items()},
        num_target_tokens={k: int(v) for k, v in meta.get("num_target_tokens", {}).items()},
        relevance_reading=meta.get("relevance_reading", "all"),
        relevance_by_reading=by_reading,
    )


def _check_loaded(meta: dict, relevance, phi: dict, tensor_path: Path) -> None:
    missing = [
        k
        for k in ("pairs", "num_teacher_layers", "selected_layers", "num_sentences", "dtype")
        if k not in meta
    ]
    if missing:
        raise MlasLoraError(f"{tensor_path.with_suffix('.json')}: missing keys {', '.join(missing)}")
    shape = (len(meta["pairs"]), meta["num_teacher_layers"])
    if relevance is None or tuple(relevance.shape) != shape:
        got = None if relevance is None else tuple(relevance.shape)
        raise MlasLoraError(f"{tensor_path}: 'relevance' should have shape {shape}, found {got}")
    expected = {phi_key(i, p, s) for i in range(shape[1]) for p in PROJECTIONS for s in ("in", "out")}
    if set(phi) != expected:
        absent, extra = sorted(expected - set(phi))[:5], sorted(set(phi) - expected)[:5]
        raise MlasLoraError(
            f"{tensor_path}: phi keys do not match the layers (missing {absent}, unexpected {extra})"
        )
    wrong = [k for k, v in phi.items() if v.ndim != 2 or v.shape[0] != shape[0]]
    if wrong:
        raise MlasLoraError(f"{tensor_path}: tensors {wrong[:5]} should have {shape[0]} rows, one per pair")
