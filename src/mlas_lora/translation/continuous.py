"""Continuous batching for greedy translation: a finished row's slot takes the next prompt at once.

The bucketed loop (`generate._greedy_batch`) decodes a bucket until its longest row ends, so most of
its late steps carry a few live rows; on a CPU a decode step costs about as much for 1 row as for 32
(the weights are streamed once per step), so those steps are nearly all waste. Here the batch is
refilled as rows finish:

    pending (longest first) ──► prefill k rows ──► join ──► decode step ──► finished rows leave
                  ▲                                               │
                  └──────────────── when >= `refill` slots are free ◄──┘

Every row keeps its own KV cache row, its own next position and its own token budget, and the cache
stays right-aligned (each row's newest token in the last column, left padding masked), the layout
`generate` uses, so nothing model-specific is needed beyond a causal LM that takes an explicit
cache. A routed model gets each forward's rows' pairs through `batch_context`.

The shared prompt prefix (the chat template's system turn and the instruction, everything every
prompt of a direction starts with) is run once per pair, under that pair's routing, and its keys
and values are copied into every row of that pair at prefill. Admission is length-sorted (longest
prompt first), so rows of one prefill need little padding and the last rows to finish are short.
Its outputs are the outputs of decoding each row alone, up to float rounding: a row's numbers do
not depend on its neighbours except through the rounding of the GEMMs and attention widths they
share (tests/test_continuous.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlas_lora.translation.rows import MIN_SHARED_PREFIX, RowScope, contiguous_head_input, shared_prefix


@dataclass
class Row:
    """One prompt to decode: its place in the output, its pair, its token ids and its token budget."""

    index: int
    pair: str
    ids: list[int]
    budget: int


@dataclass
class _Prefix:
    """The keys and values of a pair's shared prompt prefix, one row: a tensor pair per layer."""

    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(model, kv) -> object:
    """A fresh DynamicCache of the model's layer kinds holding `kv` (one [rows, heads, width, dim] pair
    per layer)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(kv):
        cache.update(keys, values, index)
    return cache


def _pad_left(tensor: torch.Tensor, width: int, front: int, dim: int) -> torch.Tensor:
    """Insert zero columns after the first `front` ones along `dim` until the size is `width` + front."""
    missing = width + front - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    head, tail = tensor.narrow(dim, 0, front), tensor.narrow(dim, front, tensor.shape[dim] - front)
    return torch.cat([head, tensor.new_zeros(shape), tail], dim=dim)


def sliding_window_limit(model) -> int | None:
    """The smallest sliding window of the model's cache layers (None: no sliding layer)."""
    from transformers import DynamicCache

    windows = [getattr(layer, "sliding_window", None) for layer in DynamicCache(config=model.config).layers]
    windows = [w for w in windows if w]
    return min(windows) if windows else None


class _Batch:
    """The rows decoding now: a right-aligned KV cache behind `front` columns that every row shares
    (a prefix-tuned model's virtual tokens), the attention mask over the rest, each row's next position,
    the token it feeds next and what it generated."""

    def __init__(self, cache, attention, positions, rows: list[Row], front: int):
        self.cache, self.attention, self.positions, self.rows, self.front = (
            cache,
            attention,
            positions,
            rows,
            front,
        )
        self.last = torch.zeros(len(rows), dtype=torch.long)
        self.generated: list[list[int]] = [[] for _ in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, tokens: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
        """Append each row's token; returns which rows are done (stop token or budget spent)."""
        for out, token in zip(self.generated, tokens.tolist(), strict=True):
            out.append(token)
        self.last = tokens
        budget_spent = torch.tensor(
            [len(g) >= r.budget for g, r in zip(self.generated, self.rows, strict=True)]
        )
        return stops[tokens] | budget_spent

    def keep(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (a bool mask), then drop the columns no remaining row uses."""
        index = keep.nonzero().squeeze(1)
        device = self.attention.device
        self.cache.batch_select_indices(index.to(device))
        self.attention = self.attention[index.to(device)]
        self.positions, self.last = self.positions[index], self.last[index]
        self.rows = [self.rows[i] for i in index.tolist()]
        self.generated = [self.generated[i] for i in index.tolist()]
        used = self.attention.any(0).nonzero()
        unused = int(used[0]) if len(used) else 0
        if unused:
            f = self.front
            kv = [
                (
                    torch.cat([k[:, :, :f], k[:, :, f + unused :]], 2),
                    torch.cat([v[:, :, :f], v[:, :, f + unused :]], 2),
                )
                for k, v in _kv(self.cache)
            ]
            self.cache = _cache_like(self.cache, kv)
            self.attention = self.attention[:, unused:]

    def join(self, other: _Batch) -> None:
        """Append `other`'s rows, padding the narrower cache on the left (after the front columns)."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        f = self.front
        kv = [
            tuple(
                torch.cat([_pad_left(a, width, f, 2), _pad_left(b, width, f, 2)], 0)
                for a, b in zip(x, y, strict=True)
            )
            for x, y in zip(_kv(self.cache), _kv(other.cache), strict=True)
        ]
        self.cache = _cache_like(self.cache, kv)
        self.attention = torch.cat(
            [_pad_left(self.attention, width, 0, 1), _pad_left(other.attention, width, 0, 1)], 0
        )
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        self.rows += other.rows
        self.generated += other.generated


def _cache_like(cache, kv):
    """`cache` with its layers' tensors replaced by `kv` (same layer kinds)."""
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = keys.shape[-2]
    return cache


class ContinuousDecoder:
    """Greedy decoding of many prompts with a batch that is refilled as rows finish (module docstring).

    `batch_size` rows decode together; a prefill admits new rows once `refill` slots are free (or the
    batch is empty, or every pending row fits), so one prefill serves several rows. With
    `prefix_cache`, each pair's shared prompt prefix is computed once and copied into its rows.
    """

    def __init__(
        self,
        model,
        stops: torch.Tensor,
        pad: int,
        batch_context=None,
        batch_size: int = 32,
        refill: int | None = None,
        prefix_cache: bool = True,
    ):
        self.model, self.stops, self.pad = model, stops, pad
        self.batch_size = batch_size
        self.refill = refill if refill is not None else max(1, batch_size // 4)
        self.prefix_cache = prefix_cache
        self.device = next(model.parameters()).device
        self.prefixes: dict[str, _Prefix] = {}
        self.scope = RowScope(batch_context, [])
        self.routed: list[str] | None = None

    def _route(self, pairs: list[str]) -> None:
        if pairs != self.routed:
            self.scope.pairs = pairs
            self.scope.set(list(range(len(pairs))))
            self.routed = list(pairs)

    def _forward(self, input_ids, attention, positions, cache, pairs: list[str]) -> torch.Tensor:
        self._route(pairs)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention,
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        return logits[:, -1].float().argmax(-1).cpu()

    @torch.inference_mode()
    def decode(self, rows: Sequence[Row], progress=None) -> dict[int, list[int]]:
        """The generated token ids of every row (stop token included), by `Row.index`."""
        if self.prefix_cache:
            self._compute_prefixes(rows)
        pending = deque(sorted(rows, key=lambda r: (-len(r.ids), r.index)))
        out: dict[int, list[int]] = {}
        batch: _Batch | None = None
        try:
            with contiguous_head_input(self.model):
                while pending or batch is not None:
                    free = self.batch_size - (len(batch) if batch is not None else 0)
                    if pending and free >= min(self.refill, len(pending)):
                        group = [pending.popleft() for _ in range(min(free, len(pending)))]
                        new, done = self._prefill(group)
                        new = self._retire(new, done, out, progress)
                        if new is not None and batch is not None:
                            batch.join(new)
                        elif new is not None:
                            batch = new
                        continue
                    batch = self._retire(batch, self._step(batch), out, progress)
        finally:
            self.scope.close()
            self.routed = None
        return out

    def _step(self, batch: _Batch) -> torch.Tensor:
        ones = batch.attention.new_ones(len(batch), 1)
        batch.attention = torch.cat([batch.attention, ones], dim=1)
        pairs = [r.pair for r in batch.rows]
        tokens = self._forward(
            batch.last[:, None], batch.attention, batch.positions[:, None], batch.cache, pairs
        )
        batch.positions = batch.positions + 1
        return batch.record(tokens, self.stops)

    def _retire(self, batch: _Batch, done: torch.Tensor, out: dict, progress) -> _Batch | None:
        if not bool(done.any()):
            return batch
        for row, generated, ended in zip(batch.rows, batch.generated, done.tolist(), strict=True):
            if ended:
                out[row.index] = generated
        if progress is not None:
            progress.update(int(done.sum()))
        if bool(done.all()):
            return None
        batch.keep(~done)
        return batch

    def _compute_prefixes(self, rows: Sequence[Row]) -> None:
        """Each pair's shared prompt prefix (at least MIN_SHARED_PREFIX tokens, two rows), run once."""
        by_pair: dict[str, list[list[int]]] = {}
        for row in rows:
            by_pair.setdefault(row.pair, []).append(row.ids)
        for pair, prompts in by_pair.items():
            if pair in self.prefixes or len(prompts) < 2:
                continue
            length = shared_prefix(prompts)
            if length < MIN_SHARED_PREFIX:
                continue
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([prompts[0][:length]])
            self._forward(
                ids, torch.ones_like(ids).to(self.device), torch.arange(length)[None], cache, [pair]
            )
            self.prefixes[pair] = _Prefix(length, [(k.clone(), v.clone()) for k, v in _kv(cache)])

    def _prefill(self, group: list[Row]) -> tuple[_Batch, torch.Tensor]:
        """Run the new rows' prompts (after their pair's cached prefix) and choose their first tokens."""
        from transformers import DynamicCache

        prefixes = [self.prefixes.get(r.pair) for r in group]
        lengths = [p.length if p is not None else 0 for p in prefixes]
        suffixes = [r.ids[n:] for r, n in zip(group, lengths, strict=True)]
        p_width, s_width = max(lengths), max(len(s) for s in suffixes)
        cache = DynamicCache(config=self.model.config)
        if p_width:
            layers = len(next(p for p in prefixes if p is not None).kv)
            kv = [
                tuple(
                    torch.cat([self._prefix_block(p, i, which, p_width) for p in prefixes], 0)
                    for which in (0, 1)
                )
                for i in range(layers)
            ]
            cache = _cache(self.model, kv)
        input_ids = torch.full((len(group), s_width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(group), p_width + s_width), dtype=torch.long)
        positions = torch.zeros((len(group), s_width), dtype=torch.long)
        for k, (suffix, n) in enumerate(zip(suffixes, lengths, strict=True)):
            input_ids[k, s_width - len(suffix) :] = torch.tensor(suffix)
            attention[k, p_width - n : p_width] = 1
            attention[k, p_width + s_width - len(suffix) :] = 1
            positions[k, s_width - len(suffix) :] = torch.arange(n, n + len(suffix))
        attention = attention.to(self.device)
        tokens = self._forward(input_ids, attention, positions, cache, [r.pair for r in group])
        front = cache.get_seq_length() - attention.shape[1]
        cache, attention = self._right_aligned(cache, attention, front)
        batch = _Batch(cache, attention, torch.tensor([len(r.ids) for r in group]), group, front)
        return batch, batch.record(tokens, self.stops)

    def _prefix_block(self, prefix: _Prefix | None, layer: int, which: int, width: int) -> torch.Tensor:
        """One row's prefix keys or values for the prefill cache: left-padded to `width` after the front."""
        if prefix is not None:
            tensor = prefix.kv[layer][which]
            front = tensor.shape[2] - prefix.length
            return _pad_left(tensor, width, front, 2)
        some = next(iter(self.prefixes.values()))  # another pair's: its front columns are every row's
        like = some.kv[layer][which]
        front = like.shape[2] - some.length
        shape = list(like.shape)
        shape[2] = front + width
        out = like.new_zeros(shape)
        out[:, :, :front] = like[:, :, :front]
        return out

    def _right_aligned(self, cache, attention, front: int):
        """Move each row's valid columns to the right end (zeros at the left), so the pads that sat between
        a row's prefix and its suffix go to its left as in `generate`'s layout."""
        rows, columns = attention.shape
        counts = attention.sum(1)
        aligned = torch.arange(columns, device=attention.device) >= (columns - counts)[:, None]
        if torch.equal(attention.bool(), aligned) and int(counts.max()) == columns:
            return cache, attention
        width = int(counts.max())
        order = torch.argsort(attention.to(torch.int8), dim=1, stable=True)[:, columns - width :]
        keep = torch.gather(attention, 1, order)
        index = order + front
        if front:
            index = torch.cat([torch.arange(front, device=index.device).expand(rows, -1), index], 1)
            keep = torch.cat([keep.new_ones(rows, front), keep], 1)
        kv = []
        for keys, values in _kv(cache):
            gathered = []
            for t in (keys, values):
                idx = index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                gathered.append(torch.gather(t, 2, idx) * keep[:, None, :, None].to(t.dtype))
            kv.append(tuple(gathered))
        return _cache_like(cache, kv), torch.gather(attention, 1, order)
