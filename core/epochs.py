"""Epochs and order of a quest's train examples: which example the quest's cursor points at.

A quest with ``epochs = E`` (``schools.<glob>.epochs``, :class:`core.config.QuestRule`) and ``n`` train
examples (the records validation kept, held-out ones excluded; indices ``0..n-1`` in file order) has a
cursor running from 0 to ``E * n``: cursor ``c`` is epoch ``e = c // n`` at position ``p = c % n``, and
trains example ``p`` (in file order) or, with ``shuffle``, example ``permutation(n, key, e)[p]``.

**The permutation** of epoch ``e`` is a Fisher-Yates shuffle (Knuth, TAOCP vol. 2, Algorithm 3.4.2P)
driven by Python's ``random.Random(seed).random()`` -- the one part of :mod:`random` whose sequence for a
given seed is guaranteed across Python versions -- with ``seed`` = the first 8 bytes (big-endian) of
``SHA-256("<quest content SHA-256>:<e>")``. It depends only on the file's content and the epoch, never on
time, the process or the global RNG, so a restart (even after SIGKILL) rebuilds the same order and the
cursor stays exact; the same file dropped again trains in the same orders.

Memory: an unshuffled quest streams (each epoch reads the file again); a shuffled one holds its ``n``
normalized train examples and one permutation of ``n`` integers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator


def permutation_seed(key: str, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation for a quest whose content SHA-256 is ``key``."""
    return int.from_bytes(hashlib.sha256(f"{key}:{epoch}".encode()).digest()[:8], "big")


def permutation(n: int, key: str, epoch: int) -> list[int]:
    """A permutation of ``range(n)``: the order of epoch ``epoch`` (see the module doc)."""
    rng = random.Random(permutation_seed(key, epoch))
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def ordered_examples(first: Iterable[tuple[int, int, dict]], again: Callable[[], Iterable[tuple[int, int, dict]]],
                     epochs: int, shuffle_key: str | None, start: int) -> Iterator[tuple[int, int, dict]]:
    """``(cursor, record number, example)`` from cursor ``start`` to ``epochs * n``, in training order.

    ``first``: the train examples ``(index, record number, example)`` in file order (index 0, 1, ...);
    ``again()``: the same stream read anew (an epoch after the first, unshuffled). ``shuffle_key``: the
    quest's content SHA-256 to shuffle each epoch with, None for file order.
    """
    if shuffle_key is not None:
        pool = [(line, example) for _, line, example in first]
        n = len(pool)
        order: list[int] = []
        current = -1
        for cursor in range(start, n * epochs):
            epoch, position = divmod(cursor, n)
            if epoch != current:
                order, current = permutation(n, shuffle_key, epoch), epoch
            line, example = pool[order[position]]
            yield cursor, line, example
        return
    n = 0
    for epoch in range(epochs):
        if epoch and n == 0:
            return
        stream = first if epoch == 0 else again()
        for index, line, example in stream:
            cursor = epoch * n + index
            if cursor >= start:
                yield cursor, line, example
            if epoch == 0:
                n = index + 1
