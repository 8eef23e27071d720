"""The per-row token lists of the sampling parameters, flattened for vectorized lookup.

The input batch holds one table per list-valued parameter (allowed ids, logit bias, the stop ids
banned before min_tokens, bad words), set when a request takes a row and cleared when it leaves;
`metadata.build_sampling_metadata` reads the entries of a step's rows from them. A table is
rebuilt only when a request that uses it comes or goes.
"""

from __future__ import annotations

import numpy as np


class RowTokenTable:
    """Per-row token-id lists (with optional float values), flattened for vectorized lookup."""

    def __init__(self) -> None:
        self._lists: dict[int, tuple[list[int], list[float]]] = {}
        self._rows = np.zeros(0, np.int64)
        self._ids = np.zeros(0, np.int64)
        self._values = np.zeros(0, np.float32)
        self._dirty = False

    def __bool__(self) -> bool:
        return bool(self._lists)

    def set(self, row: int, ids: list[int], values: list[float] | None = None) -> None:
        self._lists.pop(row, None)
        if ids:
            self._lists[row] = (list(ids), list(values) if values is not None else [])
        self._dirty = True

    def remove(self, row: int) -> None:
        if self._lists.pop(row, None) is not None:
            self._dirty = True

    def select(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of the rows with `pos[row] >= 0`, as (pos[row], token id, value)."""
        if self._dirty:
            self._rebuild()
        sel = pos[self._rows]
        keep = sel >= 0
        return sel[keep], self._ids[keep], self._values[keep] if self._values.size else self._values

    def _rebuild(self) -> None:
        items = list(self._lists.items())
        lens = [len(ids) for _, (ids, _) in items]
        self._rows = np.repeat(np.array([r for r, _ in items], np.int64), lens)
        self._ids = np.array([t for _, (ids, _) in items for t in ids], np.int64)
        values = [v for _, (_, vals) in items for v in vals]
        self._values = np.array(values, np.float32)
        self._dirty = False


class BadWordsTable:
    """Every live row's bad words, flattened: a bad word bans its last token when the row's
    latest output tokens equal the word's other tokens (vLLM's rule)."""

    def __init__(self) -> None:
        self._words: dict[int, list[list[int]]] = {}
        self._dirty = False
        self._rows = np.zeros(0, np.int64)
        self._prefix = np.zeros((0, 0), np.int64)  # right-aligned, padded with -1
        self._prefix_len = np.zeros(0, np.int64)
        self._last = np.zeros(0, np.int64)

    def __bool__(self) -> bool:
        return bool(self._words)

    def set(self, row: int, words: list[list[int]]) -> None:
        self._words.pop(row, None)
        if words:
            self._words[row] = [list(w) for w in words]
        self._dirty = True

    def remove(self, row: int) -> None:
        if self._words.pop(row, None) is not None:
            self._dirty = True

    def _rebuild(self) -> None:
        entries = [(row, w) for row, words in self._words.items() for w in words]
        width = max((len(w) - 1 for _, w in entries), default=0)
        self._rows = np.array([r for r, _ in entries], np.int64)
        self._prefix = np.full((len(entries), width), -1, np.int64)
        for i, (_, w) in enumerate(entries):
            if len(w) > 1:
                self._prefix[i, width - len(w) + 1 :] = w[:-1]
        self._prefix_len = np.array([len(w) - 1 for _, w in entries], np.int64)
        self._last = np.array([w[-1] for _, w in entries], np.int64)
        self._dirty = False

    def banned(
        self, pos: np.ndarray, token_ids: np.ndarray, num_tokens: np.ndarray, num_prompt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pos[row], token id) of each bad word whose prefix ends the row's output tokens."""
        if self._dirty:
            self._rebuild()
        sel = pos[self._rows] >= 0
        rows, prefix, plen = self._rows[sel], self._prefix[sel], self._prefix_len[sel]
        width = prefix.shape[1]
        match = (num_tokens[rows] - num_prompt[rows]) >= plen
        if width:
            cols = num_tokens[rows][:, None] - width + np.arange(width)
            toks = token_ids[rows[:, None], np.maximum(cols, 0)]
            needed = np.arange(width)[None, :] >= width - plen[:, None]
            match &= ((toks == prefix) | ~needed).all(axis=1)
        return pos[rows[match]], self._last[sel][match]
