"""One summary of a run (answer, iterations, usage, time, why it stopped), built from its
events or from a result object; every face renders it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlm.display.formatting import (
    Event,
    as_int,
    as_num,
    as_text,
    depth_of,
    field_of,
    fmt_cost,
    fmt_int,
    fmt_time,
    plural,
    preview,
    run_key,
    usage_total_tokens,
)


@dataclass
class Metrics:
    answer: str | None = None
    query: str | None = None
    model: str | None = None
    recursive_model: str | None = None
    iterations: int | None = None
    root_calls: int | None = None
    root_prompt_tokens: int | None = None
    root_completion_tokens: int | None = None
    root_tokens: int | None = None
    root_cost: float | None = None
    sub_calls: int | None = None
    sub_tokens: int | None = None
    sub_cost: float | None = None
    cached_calls: int | None = None
    saved_usd: float | None = None
    rate_limit_hits: int | None = None
    rate_limit_wait_s: float | None = None
    estimated_calls: int | None = None
    # Prompt tokens of root and sub calls, and the part of them the provider's prompt
    # cache served; completion tokens spent reasoning; what Batch APIs took off.
    prompt_tokens: int | None = None
    cached_input_tokens: int | None = None
    root_cached_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    batch_calls: int | None = None
    batch_saved_usd: float | None = None
    elapsed_s: float | None = None
    stopped_reason: str | None = None
    error: str | None = None
    log_path: str | None = None
    # Models used without a price: their cost is unknown, so it reads "unpriced", not $0.
    root_unpriced: bool = False
    sub_unpriced: bool = False

    @property
    def total_tokens(self) -> int | None:
        if self.root_tokens is None and self.sub_tokens is None:
            return None
        return (self.root_tokens or 0) + (self.sub_tokens or 0)

    @property
    def total_cost(self) -> float | None:
        if self.root_cost is None and self.sub_cost is None:
            return None
        return (self.root_cost or 0.0) + (self.sub_cost or 0.0)

    def rows(self) -> list[tuple[str, str]]:
        """The metrics table, as label/value pairs shared by the terminal and HTML."""
        root_tokens = fmt_int(self.root_tokens)
        if self.root_prompt_tokens is not None or self.root_completion_tokens is not None:
            root_tokens += (
                f" ({fmt_int(self.root_prompt_tokens)} prompt"
                f" + {fmt_int(self.root_completion_tokens)} completion)"
            )
        rows = [
            ("Iterations", fmt_int(self.iterations)),
            ("Root calls", fmt_int(self.root_calls)),
            ("Root tokens", root_tokens),
            ("Root cost", _cost(self.root_cost, self.root_unpriced)),
            ("Sub-calls", fmt_int(self.sub_calls)),
            ("Sub tokens", fmt_int(self.sub_tokens)),
            ("Sub cost", _cost(self.sub_cost, self.sub_unpriced)),
            ("Total tokens", fmt_int(self.total_tokens)),
            ("Total cost", _cost(self.total_cost, self.root_unpriced or self.sub_unpriced)),
            *self._savings_rows(),
            *self._cache_rows(),
            *self._limit_rows(),
            ("Wall time", fmt_time(self.elapsed_s)),
            ("Stopped", self.stopped_reason or "—"),
        ]
        if self.model:
            models = self.model
            if self.recursive_model and self.recursive_model != self.model:
                models += f" (sub: {self.recursive_model})"
            rows.append(("Models", models))
        if self.error:
            rows.append(("Error", preview(self.error, 300)))
        if self.log_path:
            rows.append(("Log", self.log_path))
        return rows

    @property
    def cached_share(self) -> float | None:
        """Cached input tokens over prompt tokens (None: no prompt tokens known)."""
        if not self.prompt_tokens:
            return None
        return (self.cached_input_tokens or 0) / self.prompt_tokens

    def _savings_rows(self) -> list[tuple[str, str]]:
        rows = []
        if self.cached_input_tokens and self.cached_share is not None:
            detail = f"{self.cached_input_tokens:,} of {self.prompt_tokens:,}"
            root_prompt = self.root_prompt_tokens
            if root_prompt and self.root_cached_input_tokens and root_prompt != self.prompt_tokens:
                # The root re-sends its history each turn: its share is the one to watch.
                detail += f"; root turns {self.root_cached_input_tokens / root_prompt:.0%}"
            rows.append(("Prompt cache", f"{self.cached_share:.0%} of prompt tokens read from the "
                                         f"provider's cache ({detail})"))
        if self.reasoning_tokens:
            rows.append(("Reasoning", f"{self.reasoning_tokens:,} completion tokens"))
        if self.batch_calls:
            rows.append(("Batch API", f"{self.batch_calls:,} calls, saved "
                                      f"{fmt_cost(self.batch_saved_usd or 0.0)} off list price"))
        return rows

    def _cache_rows(self) -> list[tuple[str, str]]:
        if not self.cached_calls:
            return []
        saved = f" (saved {fmt_cost(self.saved_usd)})" if self.saved_usd else ""
        return [("Cache hits", f"{self.cached_calls:,} calls answered from the cache{saved}")]

    def _limit_rows(self) -> list[tuple[str, str]]:
        rows = []
        if self.rate_limit_hits or self.rate_limit_wait_s:
            rows.append(("Rate limits", f"{self.rate_limit_hits or 0:,} refusals drawn, calls "
                                        f"held back {fmt_time(self.rate_limit_wait_s)} in all"))
        if self.estimated_calls:
            rows.append(("Usage", f"estimated for {self.estimated_calls:,} calls "
                                  "(the server reported none)"))
        return rows

    def summary(self) -> str:
        """One line with the key numbers, for a panel's subtitle."""
        parts = []
        if self.iterations is not None:
            parts.append(plural(self.iterations, "iteration"))
        if self.sub_calls is not None:
            parts.append(plural(self.sub_calls, "sub-call"))
        if self.cached_calls:
            parts.append(f"{self.cached_calls:,} cached")
        if self.total_tokens is not None:
            parts.append(f"{self.total_tokens:,} tokens")
        if self.total_cost is not None:
            parts.append(_cost(self.total_cost, self.root_unpriced or self.sub_unpriced))
        if self.cached_input_tokens and self.cached_share is not None:
            parts.append(f"{self.cached_share:.0%} input cached")
        if self.reasoning_tokens:
            parts.append(f"{self.reasoning_tokens:,} reasoning")
        if self.batch_calls:
            parts.append(f"batch saved {fmt_cost(self.batch_saved_usd or 0.0)}")
        if self.rate_limit_hits or self.rate_limit_wait_s:
            parts.append(f"rate limited {self.rate_limit_hits or 0:,}× "
                         f"(held {fmt_time(self.rate_limit_wait_s)})")
        if self.estimated_calls:
            parts.append("usage estimated")
        if self.elapsed_s is not None:
            parts.append(fmt_time(self.elapsed_s))
        if self.stopped_reason:
            parts.append(self.stopped_reason)
        return " · ".join(parts)


def _cost(value: float | None, unpriced: bool) -> str:
    if not unpriced:
        return fmt_cost(value)
    return "unpriced" if not value else f"{fmt_cost(value)} + unpriced"


def _unpriced(usage: Any) -> bool:
    return bool(field_of(usage, "unpriced_models"))


def _apply_usage(m: Metrics, usage: Any) -> None:
    root, sub = field_of(usage, "root"), field_of(usage, "sub")
    parts = [u for u in (root, sub) if u is not None]
    if any(field_of(u, "cached_calls") is not None for u in parts):
        m.cached_calls = sum(as_int(field_of(u, "cached_calls")) or 0 for u in parts)
        m.saved_usd = sum(as_num(field_of(u, "saved_usd")) or 0.0 for u in parts)
    m.rate_limit_hits = sum(as_int(field_of(u, "rate_limit_hits")) or 0 for u in parts)
    m.rate_limit_wait_s = sum(as_num(field_of(u, "rate_limit_wait_s")) or 0.0 for u in parts)
    m.estimated_calls = sum(as_int(field_of(u, "estimated_calls")) or 0 for u in parts)
    m.prompt_tokens = sum(as_int(field_of(u, "prompt_tokens")) or 0 for u in parts)
    for name in ("cached_input_tokens", "reasoning_tokens", "batch_calls"):
        setattr(m, name, sum(as_int(field_of(u, name)) or 0 for u in parts))
    m.batch_saved_usd = sum(as_num(field_of(u, "batch_saved_usd")) or 0.0 for u in parts)
    if root is not None:
        m.root_calls = as_int(field_of(root, "calls", m.root_calls))
        m.root_prompt_tokens = as_int(field_of(root, "prompt_tokens", m.root_prompt_tokens))
        m.root_completion_tokens = as_int(field_of(root, "completion_tokens", m.root_completion_tokens))
        m.root_tokens = usage_total_tokens(root)
        m.root_cost = as_num(field_of(root, "cost_usd"))
        m.root_cached_input_tokens = as_int(field_of(root, "cached_input_tokens"))
        m.root_unpriced = _unpriced(root)
    if sub is not None:
        if m.sub_calls is None:
            m.sub_calls = as_int(field_of(sub, "calls"))
        m.sub_tokens = usage_total_tokens(sub)
        m.sub_cost = as_num(field_of(sub, "cost_usd"))
        m.sub_unpriced = _unpriced(sub)


def metrics_from_events(events: list[Event], key: str | None = None) -> Metrics:
    """Summarise one run (``key``, default the first top-level one) from its events.

    ``run_end`` holds the authoritative numbers; a killed run has none, so the numbers
    are added up from what did happen and the reason says the log is incomplete.
    """
    if key is None:
        tops = [e for e in events if depth_of(e) == 0]
        key = run_key(tops[0]) if tops else (run_key(events[0]) if events else "")
    own = [e for e in events if run_key(e) == key]
    m = Metrics()
    root_prompt = root_completion = root_calls = sub_calls = cached = 0
    root_cached_input = root_reasoning = 0
    root_cost = 0.0
    unpriced = False
    for e in own:
        kind = e.get("type")
        if kind == "run_start":
            m.query = as_text(e.get("query")) or None
            m.model = as_text(e.get("model")) or None
            m.recursive_model = as_text(e.get("recursive_model")) or None
        elif kind == "root_reply":
            root_calls += 1
            usage = e.get("usage")
            root_prompt += as_int(field_of(usage, "prompt_tokens")) or 0
            root_completion += as_int(field_of(usage, "completion_tokens")) or 0
            root_cached_input += as_int(field_of(usage, "cached_input_tokens")) or 0
            root_reasoning += as_int(field_of(usage, "reasoning_tokens")) or 0
            root_cost += as_num(field_of(usage, "cost_usd")) or 0.0
            # A turn of a model without a price: the sum is unknown, never a plain $0.
            unpriced = unpriced or field_of(usage, "cost_usd") == "unpriced"
            cached += 1 if e.get("cached") else 0
        elif kind == "cell_result":
            sub_calls += as_int(e.get("sub_calls")) or 0
            cached += as_int(e.get("cached_sub_calls")) or 0
        elif kind == "final":
            m.answer = as_text(e.get("answer"))
        elif kind in ("budget", "error") and not m.error:
            m.error = as_text(e.get("reason") or e.get("message")) or None
    iterations = [n for e in own if (n := as_int(e.get("iteration"))) is not None]
    m.iterations = max(iterations) if iterations else 0
    m.root_calls, m.sub_calls = root_calls, sub_calls
    m.cached_calls = cached or None
    m.root_prompt_tokens, m.root_completion_tokens = root_prompt, root_completion
    m.root_tokens, m.root_cost = root_prompt + root_completion, root_cost
    # Until run_end says more: the root's own turns (sub-calls log no cache split).
    m.prompt_tokens, m.cached_input_tokens = root_prompt, root_cached_input
    m.root_cached_input_tokens = root_cached_input
    m.reasoning_tokens = root_reasoning
    m.root_unpriced = unpriced
    m.elapsed_s = as_num(own[-1].get("t")) if own else None
    m.stopped_reason = "incomplete (no run_end)" if own else None
    ends = [e for e in own if e.get("type") == "run_end"]
    if ends:
        end = ends[-1]
        if end.get("answer") is not None:
            m.answer = as_text(end.get("answer"))
        m.iterations = as_int(end.get("iterations")) if end.get("iterations") is not None else m.iterations
        m.sub_calls = as_int(end.get("sub_calls")) if end.get("sub_calls") is not None else m.sub_calls
        m.elapsed_s = as_num(end.get("elapsed_s")) if end.get("elapsed_s") is not None else m.elapsed_s
        m.stopped_reason = as_text(end.get("stopped_reason")) or None
        m.error = as_text(end.get("error")) or m.error
        _apply_usage(m, end.get("usage"))
    return m


def metrics_from_result(result: Any) -> Metrics:
    events = list(field_of(result, "trajectory", []) or [])
    m = metrics_from_events(events) if events else Metrics()
    # The result's own fields win over what the events say: they are the final word.
    answer = field_of(result, "answer")
    if answer is not None:
        m.answer = as_text(answer)
    for name in ("iterations", "sub_calls"):
        value = as_int(field_of(result, name))
        if value is not None:
            setattr(m, name, value)
    elapsed = as_num(field_of(result, "elapsed_s"))
    if elapsed is not None:
        m.elapsed_s = elapsed
    if field_of(result, "stopped_reason"):
        m.stopped_reason = as_text(field_of(result, "stopped_reason"))
    if field_of(result, "error"):
        m.error = as_text(field_of(result, "error"))
    if field_of(result, "log_path"):
        m.log_path = as_text(field_of(result, "log_path"))
    usage = field_of(result, "usage")
    if usage is not None:
        _apply_usage(m, usage)
    return m


