"""The n-gram (prompt lookup) proposer of speculative decoding: pure Python, on the scheduler's side.

For a decoding request, the last `n` tokens (n from `prompt_lookup_max` down to
`prompt_lookup_min`) are looked up earlier in its tokens (prompt and output); at the latest
earlier occurrence of the longest n that has one, the up-to-k tokens that followed it are the
draft. The target model then computes the request's last token and the draft in one step, and
the worker's rejection sampler keeps the draft's verified prefix (`worker/sample/rejection.py`).

NOTE: the search runs over the tokens' int32 bytes with `bytes.rfind` (C speed), keeping only
matches aligned on a token; a draft depends on the tokens alone (not on the batch), so a seeded
request's output does not depend on its neighbours.
"""

from __future__ import annotations

from array import array

from pagedllm.config import SpeculativeConfig

_ITEM = array("i").itemsize


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Up to `min(k, max_tokens)` tokens that followed the latest earlier occurrence of the
        longest suffix n-gram of `token_ids`; [] when none occurs."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        num = len(token_ids)
        if k <= 0 or num <= self.min_n:
            return []
        # NOTE: clipped to int32, as the worker stores them: ids are < vocab anyway.
        data = array("i", token_ids).tobytes()
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            start = _rfind_aligned(data, data[(num - n) * _ITEM :], (num - 1) * _ITEM)
            if start is not None:
                first = start + n
                return token_ids[first : first + k]
        return []


def _rfind_aligned(data: bytes, needle: bytes, end: int) -> int | None:
    """The token index of the last occurrence of `needle` within `data[:end]` that starts on a
    token boundary, or None."""
    while end >= len(needle):
        pos = data.rfind(needle, 0, end)
        if pos < 0:
            return None
        if pos % _ITEM == 0:
            return pos // _ITEM
        end = pos + len(needle) - 1
    return None
