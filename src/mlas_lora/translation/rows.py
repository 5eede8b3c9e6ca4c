"""What the greedy decoders share: the output head's contiguous input, the routing scope of the rows
still decoding, and the prompt prefix every row of a batch starts with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def contiguous_head_input(model) -> Iterator[None]:
    """Make the output head's input contiguous while generating (a CPU speed workaround).

    At each prefill, transformers feeds the head the last position, `hidden[:, -1:, :]`, a
    non-contiguous [batch, 1, hidden] view. When the head's weight does not require grad (any
    frozen base: PEFT, the routed student, `merged`), `torch.matmul` does not fold that view into
    one mm: it expands the [vocab, hidden] weight over the batch and copies it (2.7 GB and about 5 s
    per prefill for 10 rows over a 152k vocabulary on 2 CPU cores; pytorch/pytorch#186148).
    Copying the [batch, 1, hidden] input instead costs nothing. Outputs are unchanged.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class RowScope:
    """Keeps `batch_context` entered for exactly the rows still decoding (a routed model's routing)."""

    def __init__(self, batch_context, pairs: list[str]):
        self.batch_context, self.pairs = batch_context, pairs
        self.stack = contextlib.ExitStack()

    def set(self, rows: list[int]) -> None:
        self.stack.close()
        if self.batch_context is not None:
            self.stack.enter_context(self.batch_context([self.pairs[r] for r in rows]))

    def close(self) -> None:
        self.stack.close()


MIN_SHARED_PREFIX = 4
"""Fewer shared prompt tokens than this are not worth a separate prefix pass."""


def shared_prefix(batch_ids: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt of the batch starts with, leaving every row >= 1 token."""
    first, shortest = batch_ids[0], min(len(ids) for ids in batch_ids)
    n = 0
    while n < shortest - 1 and all(ids[n] == first[n] for ids in batch_ids):
        n += 1
    return n
