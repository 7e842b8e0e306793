"""Prompt caching as providers report it: which part of a prompt was seen before.

Holds :class:`PromptCache`, one per server, remembering prompt prefixes per model:
OpenAI's automatic prefix rule (a prompt of at least 1,024 tokens reports
``cached_tokens`` for its longest prefix, counted in 128-token steps, that an earlier
request to the same model shared) and Anthropic's ``cache_control`` rule (a prefix up to
a breakpoint is written the first time, ``cache_creation_input_tokens``, and read by later
requests that share it, ``cache_read_input_tokens``). Tokens are the fake's (characters /
4). It must not hold wire formats or usage objects: the protocols put the numbers in.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Sequence

__all__ = ["OPENAI_MIN_CHARS", "PromptCache"]

_CHARS_PER_TOKEN = 4
OPENAI_MIN_TOKENS = 1024
OPENAI_STEP_TOKENS = 128
# The shortest prompt OpenAI caches, in the fake's characters.
OPENAI_MIN_CHARS = OPENAI_MIN_TOKENS * _CHARS_PER_TOKEN
# Anthropic looks this many blocks back from a breakpoint for an earlier cached prefix.
ANTHROPIC_LOOKBACK = 20
# Prefix digests kept per server; the oldest go first (a provider's cache evicts too).
_MAX_ENTRIES = 200_000


class PromptCache:
    """Prefix digests seen per model, for OpenAI's and Anthropic's cache reports.
    ``anthropic_min_tokens`` is the shortest prefix Anthropic caches (1,024 for most
    models; a shorter breakpoint is neither written nor read)."""

    def __init__(self, anthropic_min_tokens: int = 1024) -> None:
        self.anthropic_min_tokens = anthropic_min_tokens
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _remember(self, digests: Sequence[bytes]) -> None:
        seen = self._seen
        for digest in digests:
            seen[digest] = None
            seen.move_to_end(digest)
        while len(seen) > _MAX_ENTRIES:
            seen.popitem(last=False)

    def openai_cached_tokens(self, model: str, parts: Sequence[tuple[str, str]]) -> int:
        """Cached tokens for a prompt of ``(role, text)`` parts sent to ``model``, and
        remember it: the longest earlier-seen prefix ending at 1,024 + 128k tokens."""
        total = sum(len(text) for _, text in parts)
        first = OPENAI_MIN_TOKENS * _CHARS_PER_TOKEN
        if total < first:
            return 0
        step = OPENAI_STEP_TOKENS * _CHARS_PER_TOKEN
        digests: list[bytes] = []
        hasher = hashlib.blake2b(model.encode(), digest_size=16)
        pos = 0
        boundary = first
        for role, text in parts:
            hasher.update(b"\x00" + role.encode() + b"\x00")
            start = 0
            while boundary <= pos + len(text):
                cut = boundary - pos
                hasher.update(text[start:cut].encode())
                start = cut
                digests.append(hasher.copy().digest())
                boundary += step
            hasher.update(text[start:].encode())
            pos += len(text)
        with self._lock:
            seen = self._seen
            hits = 0
            for index in range(len(digests) - 1, -1, -1):
                if digests[index] in seen:
                    hits = index + 1
                    break
            self._remember(digests)
        return 0 if hits == 0 else OPENAI_MIN_TOKENS + (hits - 1) * OPENAI_STEP_TOKENS

    def anthropic_usage(
        self, model: str, blocks: Sequence[tuple[str, bool]]
    ) -> tuple[int, int]:
        """``(cache_read_input_tokens, cache_creation_input_tokens)`` for a prompt of
        ``(text, has_cache_control)`` blocks in Anthropic's order (tools, system,
        messages) sent to ``model``, and remember the prefixes it writes."""
        breakpoints = [i for i, (_, marked) in enumerate(blocks) if marked]
        if not breakpoints:
            return 0, 0
        hasher = hashlib.blake2b(model.encode(), digest_size=16)
        digests: list[bytes] = []
        ends: list[int] = []
        pos = 0
        for index, (text, _) in enumerate(blocks):
            hasher.update(b"\x00" + str(index).encode() + b"\x00" + text.encode())
            pos += len(text)
            digests.append(hasher.copy().digest())
            ends.append(pos)
        minimum = self.anthropic_min_tokens * _CHARS_PER_TOKEN
        candidates = sorted(
            {i for bp in breakpoints for i in range(max(0, bp - ANTHROPIC_LOOKBACK), bp + 1)},
            reverse=True,
        )
        with self._lock:
            read_at = next((i for i in candidates if digests[i] in self._seen), None)
            written = [
                i for i in breakpoints
                if ends[i] >= minimum and (read_at is None or i > read_at)
            ]
            self._remember([digests[i] for i in written])
            if read_at is not None:
                self._remember([digests[read_at]])
        read_chars = ends[read_at] if read_at is not None else 0
        read = read_chars // _CHARS_PER_TOKEN
        created = 0
        if written:
            created = ends[written[-1]] // _CHARS_PER_TOKEN - read
        return read, max(0, created)
