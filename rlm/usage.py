"""Usage, prices and the per-run budget ledger.

- ``Usage``/``ModelUsage``: immutable snapshots (calls, tokens, cost, retries) that
  add up and print readably; a model without a price shows "unpriced", never $0.
- ``UsageMeter``: thread-safe counters with a price table; each client has one and
  each run passes its own along with every call, so runs sharing a client still get
  exact usage of their own.
- Prices: the built-in table, a JSON prices file (``RLM_PRICES`` names one), and
  ``prices=`` mappings, merged in that order; ``parse_price`` reads ``MODEL=IN,OUT``.
  A model is priced by its exact name, or as a dated snapshot (``NAME-YYYY-MM-DD``) of a
  priced ``NAME``: never by a shared prefix (``o3-pro`` is not ``o3``).
- ``BudgetLedger``: one per run (its child runs and envs share it). Every model call
  reserves a conservative estimate before it is sent and settles the real usage when
  the reply arrives, so a spent budget stops sending, not the next step. A run's
  ledger may draw from a job's (``spending_from``), so job caps bind per call too.
  Under a cost limit, a call to a model without a price is refused (its cost could not
  be counted), whatever path it came by; ``check_budgetable`` refuses the request
  parameters a reservation cannot see (``n`` completions, two completion caps).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import html
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rlm.errors import BudgetExhaustedError, ConfigError, UnpricedModelError

PRICES_ENV = "RLM_PRICES"

# USD per 1M tokens (input, output), from the providers' public price lists. Matched by
# exact name, or as a dated snapshot of a listed name ("gpt-4o-mini-2024-07-18" costs what
# "gpt-4o-mini" does); a snapshot priced differently is listed under its own name.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    # Anthropic (anthropic/...), list prices; the dated ids are what replies name. Cache
    # reads and writes are priced from Reply's cached/creation token fields.
    "claude-opus-4-5": (5.00, 25.00),
    "claude-opus-4-5-20251101": (5.00, 25.00),
    "claude-opus-4-1": (15.00, 75.00),
    "claude-opus-4-1-20250805": (15.00, 75.00),
    "claude-opus-4-0": (15.00, 75.00),
    "claude-opus-4-20250514": (15.00, 75.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-sonnet-4-5-20250929": (3.00, 15.00),
    "claude-sonnet-4-0": (3.00, 15.00),
    "claude-sonnet-4-20250514": (3.00, 15.00),
    "claude-3-7-sonnet-latest": (3.00, 15.00),
    "claude-3-7-sonnet-20250219": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-haiku-4-5-20251001": (1.00, 5.00),
    "claude-3-5-haiku-latest": (0.80, 4.00),
    "claude-3-5-haiku-20241022": (0.80, 4.00),
    "claude-3-haiku-20240307": (0.25, 1.25),
    # Gemini (gemini/...), paid tier, prompts up to 200k tokens (longer ones cost more).
    "gemini-3-pro-preview": (2.00, 12.00),
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
}

# Decimal places of USD amounts in JSON output: a millionth of a dollar.
COST_DECIMALS = 6

# The share of list price taken off calls answered through a provider's Batch API
# (OpenAI's and Anthropic's both halve it), for every model until the price table says
# otherwise per model.
BATCH_DISCOUNT = 0.5

PRICE_HELP = (
    "give it a price: RLM(prices={{{model!r}: (usd_per_1M_in, usd_per_1M_out)}}), "
    "rlm run --price {model}=IN,OUT or --prices FILE.json, or a prices file named by "
    f"{PRICES_ENV}"
)


# -- prices ------------------------------------------------------------------------


def _price_pair(model: str, value: Any, where: str) -> tuple[float, float]:
    if isinstance(value, Mapping):
        value = (value.get("input"), value.get("output"))
    try:
        pin, pout = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"the price of {model!r} in {where} must be [usd_per_1M_in, usd_per_1M_out] "
            f'or {{"input": ..., "output": ...}}, not {value!r}'
        ) from None
    if not (pin >= 0 and pout >= 0 and math.isfinite(pin) and math.isfinite(pout)):
        raise ConfigError(f"the price of {model!r} in {where} must be two numbers >= 0")
    return pin, pout


def check_prices(prices: Mapping[str, Any], where: str = "prices") -> dict[str, tuple[float, float]]:
    """Validate a ``{model: (usd_per_1M_in, usd_per_1M_out)}`` mapping; ConfigError if bad."""
    if not isinstance(prices, Mapping):
        raise ConfigError(f"{where} must map model names to (usd_per_1M_in, usd_per_1M_out)")
    return {str(m): _price_pair(str(m), v, where) for m, v in prices.items()}


def load_prices_file(path: str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    """Read a JSON prices file: ``{"model": [in, out], ...}`` in USD per 1M tokens."""
    where = f"prices file {os.fspath(path)}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    return check_prices(data, where)


def parse_price(spec: str) -> tuple[str, tuple[float, float]]:
    """Parse ``MODEL=IN,OUT`` (USD per 1M input and output tokens) into a table entry."""
    model, sep, pair = spec.rpartition("=")
    parts = pair.split(",")
    if not sep or not model or len(parts) != 2:
        raise ConfigError(
            f"a price is MODEL=IN,OUT in USD per 1M tokens (e.g. my-model=0.15,0.60), not {spec!r}"
        )
    return model, _price_pair(model, parts, "--price")


def resolve_prices(explicit: Mapping[str, Any] | None = None) -> dict[str, tuple[float, float]]:
    """The built-in table, then the file named by ``RLM_PRICES``, then ``explicit``."""
    table = dict(DEFAULT_PRICES)
    path = os.environ.get(PRICES_ENV)
    if path:
        table.update(load_prices_file(path))
    if explicit:
        table.update(check_prices(explicit))
    return table


# OpenAI's dated snapshots: the documented family a price extends to.
_SNAPSHOT = re.compile(r"(?P<base>.+)-\d{4}-\d{2}-\d{2}")


def lookup_price(
    prices: Mapping[str, tuple[float, float]], model: str
) -> tuple[float, float] | None:
    """A model's price by exact name, else as a dated snapshot of a priced model
    (``NAME-YYYY-MM-DD``), else None. Never by a shared prefix: ``o3-pro`` is another
    model than ``o3``, at another price."""
    if model in prices:
        return prices[model]
    snapshot = _SNAPSHOT.fullmatch(model)
    if snapshot is not None:
        return prices.get(snapshot.group("base"))
    return None


# -- usage snapshots -----------------------------------------------------------------


def _cached_text(calls: int, saved_usd: float, saved_tokens: int, priced: bool) -> str:
    if not calls:
        return ""
    saved = f"${saved_usd:.4f}" if priced and saved_usd else f"{saved_tokens:,} tokens"
    return f", cached_calls={calls:,} (saved {saved})"


def _cost_text(cost: float, unpriced: list[str]) -> str:
    if not unpriced:
        return f"${cost:.4f}"
    names = ", ".join(unpriced)
    if cost > 0:
        return f"${cost:.4f} + unpriced ({names})"
    return f"unpriced ({names})"


@dataclass(frozen=True)
class ModelUsage:
    """Counters for one model: calls that returned, tokens, and USD cost.

    ``priced`` is False when the model has no price, so ``cost_usd`` is unknown (0.0
    here, shown as "unpriced"). ``cached_calls`` were answered by the sub-query cache
    (or joined an identical request in flight) without a request of their own: they
    are not in ``calls`` or the tokens; ``saved_tokens`` and ``saved_usd`` are what
    they would have cost. ``estimated_calls`` of the calls came back without usage from
    the server: their tokens are the conservative estimate made before sending.
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = True
    cached_calls: int = 0
    saved_tokens: int = 0
    saved_usd: float = 0.0
    estimated_calls: int = 0

    def __add__(self, other: ModelUsage) -> ModelUsage:
        return ModelUsage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.cost_usd + other.cost_usd,
            self.priced and other.priced,
            self.cached_calls + other.cached_calls,
            self.saved_tokens + other.saved_tokens,
            self.saved_usd + other.saved_usd,
            self.estimated_calls + other.estimated_calls,
        )

    def __repr__(self) -> str:
        cost = f"${self.cost_usd:.4f}" if self.priced else "unpriced"
        return (
            f"ModelUsage(calls={self.calls:,}, tokens={self.total_tokens:,} "
            f"(in {self.prompt_tokens:,}, out {self.completion_tokens:,}), cost={cost}"
            f"{_cached_text(self.cached_calls, self.saved_usd, self.saved_tokens, self.priced)})"
        )


@dataclass(frozen=True)
class Usage:
    """A snapshot of usage: totals, failures, retries and a per-model split.

    Fields: ``calls`` (model calls that returned), ``prompt_tokens``,
    ``completion_tokens`` and ``total_tokens`` (their tokens), ``cost_usd`` (their cost
    in USD, priced models only), ``failed_calls`` (calls that failed after their
    retries), ``retries`` (attempts repeated after a transient error), ``by_model``
    (a ``ModelUsage`` per model name), ``cached_calls`` (calls the sub-query cache
    answered, or that joined an identical request in flight: not in ``calls`` or the
    tokens), ``saved_tokens`` and ``saved_usd`` (what those would have cost;
    ``saved_usd`` for priced models only), ``rate_limit_hits`` (refusals, 429 and 503,
    drawn), ``rate_limit_wait_s`` (seconds calls spent held back by rate limits:
    pacing, and the waits refusals asked for, summed over calls) and
    ``estimated_calls`` (calls that came back without usage: their tokens are the
    estimate made before sending).

    Snapshots add up (``root.usage + sub.usage``), so a run can report root and
    sub-model usage separately and together. ``cost_text`` says "unpriced" for models
    without a price instead of a misleading $0; ``unpriced_models`` names them.
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    failed_calls: int = 0
    retries: int = 0
    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    cached_calls: int = 0
    saved_tokens: int = 0
    saved_usd: float = 0.0
    rate_limit_hits: int = 0
    rate_limit_wait_s: float = 0.0
    estimated_calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        by_model = dict(self.by_model)
        for name, mu in other.by_model.items():
            by_model[name] = by_model[name] + mu if name in by_model else mu
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.cost_usd + other.cost_usd,
            self.failed_calls + other.failed_calls,
            self.retries + other.retries,
            by_model,
            self.cached_calls + other.cached_calls,
            self.saved_tokens + other.saved_tokens,
            self.saved_usd + other.saved_usd,
            self.rate_limit_hits + other.rate_limit_hits,
            self.rate_limit_wait_s + other.rate_limit_wait_s,
            self.estimated_calls + other.estimated_calls,
        )

    def __sub__(self, other: Usage) -> Usage:
        """The usage between two snapshots of the same meter (``after - before``)."""
        by_model = {}
        for name, mu in self.by_model.items():
            base = other.by_model.get(name, ModelUsage())
            diff = ModelUsage(
                mu.calls - base.calls,
                mu.prompt_tokens - base.prompt_tokens,
                mu.completion_tokens - base.completion_tokens,
                mu.total_tokens - base.total_tokens,
                mu.cost_usd - base.cost_usd,
                mu.priced,
                mu.cached_calls - base.cached_calls,
                mu.saved_tokens - base.saved_tokens,
                mu.saved_usd - base.saved_usd,
                mu.estimated_calls - base.estimated_calls,
            )
            if diff.calls or diff.total_tokens or diff.cached_calls:
                by_model[name] = diff
        return Usage(
            self.calls - other.calls,
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.total_tokens - other.total_tokens,
            self.cost_usd - other.cost_usd,
            self.failed_calls - other.failed_calls,
            self.retries - other.retries,
            by_model,
            self.cached_calls - other.cached_calls,
            self.saved_tokens - other.saved_tokens,
            self.saved_usd - other.saved_usd,
            self.rate_limit_hits - other.rate_limit_hits,
            self.rate_limit_wait_s - other.rate_limit_wait_s,
            self.estimated_calls - other.estimated_calls,
        )

    @property
    def unpriced_models(self) -> list[str]:
        """Models used without a known price (their cost is not in ``cost_usd``)."""
        return [name for name, mu in self.by_model.items() if not mu.priced]

    @property
    def cost_text(self) -> str:
        """The cost as people read it: "$0.0755", "unpriced (m)" or "$0.01 + unpriced (m)"."""
        return _cost_text(self.cost_usd, self.unpriced_models)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for logs and ``--json`` output); USD amounts are rounded
        to ``COST_DECIMALS`` places, so sums print as 0.0113688, not 0.011368799999999998."""
        # Field by field: dataclasses.asdict deep-copies recursively, a measurable cost
        # when a job writes thousands of records.
        data: dict[str, Any] = {name: getattr(self, name) for name in _USAGE_FIELDS}
        data["by_model"] = {
            model: {name: getattr(mu, name) for name in _MODEL_USAGE_FIELDS}
            for model, mu in self.by_model.items()
        }
        for row in (data, *data["by_model"].values()):
            row["cost_usd"] = round(row["cost_usd"], COST_DECIMALS)
            row["saved_usd"] = round(row["saved_usd"], COST_DECIMALS)
        data["unpriced_models"] = self.unpriced_models
        return data

    def __repr__(self) -> str:
        bits = [
            f"calls={self.calls:,}",
            f"tokens={self.total_tokens:,} (in {self.prompt_tokens:,}, out {self.completion_tokens:,})",
            f"cost={self.cost_text}",
        ]
        if self.retries:
            bits.append(f"retries={self.retries:,}")
        if self.failed_calls:
            bits.append(f"failed={self.failed_calls:,}")
        if self.rate_limit_hits or self.rate_limit_wait_s:
            bits.append(f"rate_limited={self.rate_limit_hits:,} "
                        f"(waited {self.rate_limit_wait_s:.1f} s)")
        if self.estimated_calls:
            bits.append(f"estimated_usage_calls={self.estimated_calls:,}")
        cached = _cached_text(self.cached_calls, self.saved_usd, self.saved_tokens,
                              not self.unpriced_models)
        return f"Usage({', '.join(bits)}{cached})"

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = [
            (name, f"{mu.calls:,}", f"{mu.prompt_tokens:,}", f"{mu.completion_tokens:,}",
             f"${mu.cost_usd:.4f}" if mu.priced else "unpriced")
            for name, mu in self.by_model.items()
        ]
        if len(rows) != 1:
            rows.append(("total", f"{self.calls:,}", f"{self.prompt_tokens:,}",
                         f"{self.completion_tokens:,}", self.cost_text))
        return rows

    def _footer(self) -> str:
        footer = f"retries {self.retries:,} · failed calls {self.failed_calls:,}"
        if self.cached_calls:
            saved = (f"saved ${self.saved_usd:.4f}" if self.saved_usd
                     else f"saved {self.saved_tokens:,} tokens")
            footer += f" · cached calls {self.cached_calls:,} ({saved})"
        if self.rate_limit_hits or self.rate_limit_wait_s:
            footer += (f" · rate limited {self.rate_limit_hits:,}× "
                       f"(waited {self.rate_limit_wait_s:.1f} s)")
        if self.estimated_calls:
            footer += f" · usage estimated for {self.estimated_calls:,} calls"
        return footer

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="usage", caption=self._footer(), title_justify="left")
        for name, justify in (("model", "left"), ("calls", "right"), ("in", "right"),
                              ("out", "right"), ("cost", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in self._rows():
            table.add_row(*row)
        return table

    def _repr_html_(self) -> str:
        head = "".join(
            f"<th style='text-align:{'left' if n == 'model' else 'right'}'>{n}</th>"
            for n in ("model", "calls", "in tokens", "out tokens", "cost")
        )
        body = "".join(
            "<tr>"
            + "".join(
                f"<td style='text-align:{'left' if i == 0 else 'right'}'>{html.escape(v)}</td>"
                for i, v in enumerate(row)
            )
            + "</tr>"
            for row in self._rows()
        )
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<div style='opacity:.7'>{html.escape(self._footer())}</div>"
        )


_USAGE_FIELDS = tuple(f.name for f in fields(Usage) if f.name != "by_model")
_MODEL_USAGE_FIELDS = tuple(f.name for f in fields(ModelUsage))


class UsageMeter:
    """Thread-safe usage counters with a price table; ``snapshot()`` gives a ``Usage``.

    ``on_retry``, when given, is called with each retry's notice (on the engine loop),
    so a run's live view can show retries as they happen.
    """

    def __init__(self, prices: Mapping[str, tuple[float, float]],
                 on_retry: Callable[[Any], None] | None = None) -> None:
        self.prices: dict[str, tuple[float, float]] = dict(prices)
        self.on_retry = on_retry
        self._lock = threading.Lock()
        self._models: dict[str, list[Any]] = {}
        self._failed = 0
        self._retries = 0
        self._refusals = 0
        self._waited = 0.0

    def price(self, model: str) -> tuple[float, float] | None:
        """The price this meter uses for ``model`` (None: unpriced)."""
        return lookup_price(self.prices, model)

    def record(self, model: str, prompt_tokens: int, completion_tokens: int,
               estimated: bool = False, *, batch: bool = False) -> None:
        """Count one call that returned, with its tokens (and cost, when priced);
        ``estimated``: the server reported no usage, these are estimates; ``batch``: it
        was answered through a Batch API, at ``BATCH_DISCOUNT`` off."""
        price = self.price(model)
        cost = 0.0
        if price:
            cost = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000
            if batch:
                cost *= 1.0 - BATCH_DISCOUNT
        with self._lock:
            row = self._row(model, price)
            row[0] += 1
            row[1] += prompt_tokens
            row[2] += completion_tokens
            row[3] += cost
            row[8] += estimated

    def cached(self, model: str, prompt_tokens: int, completion_tokens: int, calls: int = 1) -> None:
        """Count ``calls`` calls the cache answered, with the tokens they would have
        used (summed over them) and so what they saved; nothing is spent."""
        price = self.price(model)
        saved = 0.0
        if price:
            saved = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000
        with self._lock:
            row = self._row(model, price)
            row[5] += calls
            row[6] += prompt_tokens + completion_tokens
            row[7] += saved

    def _row(self, model: str, price: tuple[float, float] | None) -> list[Any]:
        # calls, prompt, completion, cost, priced, cached calls, saved tokens, saved USD,
        # estimated calls; the caller holds the lock.
        row = self._models.get(model)
        if row is None:
            row = self._models[model] = [0, 0, 0, 0.0, price is not None, 0, 0, 0.0, 0]
        return row

    def failed(self) -> None:
        """Count one call that failed for good."""
        with self._lock:
            self._failed += 1

    def retried(self, notice: Any = None) -> None:
        """Count one retry (an attempt that failed and is sent again); ``notice`` says
        what failed, for ``on_retry``."""
        with self._lock:
            self._retries += 1
        if self.on_retry is not None and notice is not None:
            try:
                self.on_retry(notice)
            except Exception:  # noqa: BLE001, S110 - a display must not stop a call
                pass

    def refused(self) -> None:
        """Count one refusal (429 or 503) drawn."""
        with self._lock:
            self._refusals += 1

    def rate_limit_wait(self, seconds: float) -> None:
        """Count ``seconds`` a call spent held back by rate limits."""
        with self._lock:
            self._waited += seconds

    def snapshot(self) -> Usage:
        """The counters so far as an immutable ``Usage``."""
        with self._lock:
            rows = {m: list(r) for m, r in self._models.items()}
            failed, retries = self._failed, self._retries
            refusals, waited = self._refusals, self._waited
        by_model = {
            m: ModelUsage(int(r[0]), int(r[1]), int(r[2]), int(r[1] + r[2]), r[3], bool(r[4]),
                          int(r[5]), int(r[6]), r[7], int(r[8]))
            for m, r in rows.items()
        }
        total = sum(by_model.values(), ModelUsage())
        return Usage(
            total.calls,
            total.prompt_tokens,
            total.completion_tokens,
            total.total_tokens,
            total.cost_usd,
            failed,
            retries,
            by_model,
            total.cached_calls,
            total.saved_tokens,
            total.saved_usd,
            refusals,
            waited,
            total.estimated_calls,
        )


# -- the budget ledger ---------------------------------------------------------------

# Completion tokens assumed for a request without max_tokens before any reply was seen.
DEFAULT_COMPLETION_ESTIMATE = 256


def estimate_parts(prompt_chars: int, max_tokens: int | None,
                   largest_completion: int = 0) -> tuple[int, int]:
    """A conservative (prompt, completion) token count for one call before it is sent:
    prompt characters / 4 (plus one), and the request's ``max_tokens``, or the largest
    completion seen so far, or 256. Budgets reserve it, rate-limit pacing charges it, and
    a reply without usage is settled at it."""
    return prompt_chars // 4 + 1, max_tokens or largest_completion or DEFAULT_COMPLETION_ESTIMATE


def estimate_tokens(prompt_chars: int, max_tokens: int | None, largest_completion: int = 0) -> int:
    """``estimate_parts`` in one number."""
    prompt, completion = estimate_parts(prompt_chars, max_tokens, largest_completion)
    return prompt + completion


@dataclass(slots=True)
class Hold:
    """One call's reservation: what was set aside until its reply settles it, and the
    requested model's price (the reply may name a model the table does not know)."""

    tokens: int
    cost: float
    price: tuple[float, float] | None = None


def check_budgetable(params: Mapping[str, Any]) -> None:
    """Refuse (TypeError) sub-query parameters whose cost a reservation cannot see:
    ``n`` other than 1 (a call reserves one completion, and ``llm_query`` returns one
    reply, so more would be paid for and never read) and both ``max_tokens`` and
    ``max_completion_tokens`` (the reservation reads one cap, the server may apply the
    other), or a cap that is not a positive int."""
    n = params.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise TypeError(
            "llm_query takes n=1 only: it returns one reply, and a budget reserves one "
            "completion per call; for several samples, send several prompts (llm_query_batch)"
        )
    caps = [name for name in ("max_tokens", "max_completion_tokens") if params.get(name) is not None]
    if len(caps) > 1:
        raise TypeError("give llm_query max_tokens or max_completion_tokens, not both")
    for name in caps:
        value = params[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TypeError(f"llm_query's {name} must be a positive int, not {value!r}")


class BudgetLedger:
    """A run's shared budget: token, cost and time limits that bind per model call.

    Used on the engine loop only (``exhaust`` and ``time_up`` excepted: a deadline may
    fire on another loop). ``reserve`` sets aside a conservative estimate (prompt chars
    / 4 plus the request's ``max_tokens``, or the largest completion seen so far, or
    256) and waits while reservations in flight fill the budget; once the settled usage
    reaches a limit (or the deadline passes) it raises ``BudgetExhaustedError`` for
    every later call. ``settle`` replaces a hold by the real usage; ``cancel`` drops it
    (the call was not answered). So the overshoot of a limit is at most the calls
    already in flight when it ran out.

    A ledger may draw from a ``parent`` (a job's ledger, named "job"): every hold and
    every settled call counts in both, a call is sent only when it fits in each, the
    earlier deadline of the two applies, and once the parent is spent the child is
    too. ``name`` prefixes the reasons ("job max_tokens=5000"), so a run's error says
    whose budget ran out.
    """

    def __init__(
        self,
        *,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        max_time_s: float | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        parent: BudgetLedger | None = None,
        name: str = "",
    ) -> None:
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.max_time_s = max_time_s
        self.prices = dict(prices or DEFAULT_PRICES)
        self.parent = parent
        self._prefix = f"{name} " if name else ""
        self._clock = clock
        self.deadline = clock() + max_time_s if max_time_s is not None else None
        # Whose deadline binds: this ledger's or an ancestor's earlier one.
        self._deadline_owner: BudgetLedger = self
        if parent is not None and parent.deadline is not None and (
            self.deadline is None or parent.deadline < self.deadline
        ):
            self.deadline = parent.deadline
            self._deadline_owner = parent._deadline_owner
        # This ledger and its ancestors; those with a token or cost limit hold for a call.
        self._chain: tuple[BudgetLedger, ...] = (self, *(parent._chain if parent else ()))
        self._spenders = tuple(
            ledger for ledger in self._chain
            if ledger.max_tokens is not None or ledger.max_cost_usd is not None
        )
        self.spent_tokens = 0
        self.spent_cost = 0.0
        self._held_tokens = 0
        self._held_cost = 0.0
        self._holds = 0
        self._largest_completion = 0
        self._waiters: list[asyncio.Future[None]] = []
        # Guards only the waiters list, which exhaust() may swap from another thread.
        self._waiters_lock = threading.Lock()
        self._exhausted: str | None = None

    @property
    def exhausted(self) -> str | None:
        """Why nothing more may be sent (this ledger's reason, else a parent's), or None."""
        if self._exhausted is not None or self.parent is None:
            return self._exhausted
        return self.parent.exhausted

    @property
    def limits_spending(self) -> bool:
        """True when a token or cost limit is set here or on a parent (a deadline alone
        needs no holds)."""
        return bool(self._spenders)

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - self._clock()

    def describe(self) -> str:
        """What ran out, with what was spent, for a run's ``error`` text."""
        reason = self._exhausted
        if reason is None:
            parent = self.parent
            return parent.describe() if parent is not None and parent.exhausted else "within budget"
        kind = reason.removeprefix(self._prefix)
        if kind.startswith("max_tokens"):
            return f"{reason} reached (used {self.spent_tokens:,} tokens)"
        if kind.startswith("max_cost_usd"):
            return f"{reason} reached (spent ${self.spent_cost:.4f})"
        return f"{reason} reached"

    def exhaust(self, reason: str) -> None:
        """Mark the budget spent (e.g. ``"max_time_s=2"``): every later call is refused."""
        if self._exhausted is None:
            self._exhausted = reason
        self._wake()

    def time_up(self) -> None:
        """The deadline has passed: exhaust the ledger whose deadline it is."""
        owner = self._deadline_owner
        owner.exhaust(f"{owner._prefix}max_time_s={owner.max_time_s:g}")

    def check(self) -> None:
        """Raise ``BudgetExhaustedError`` if nothing more may be sent."""
        if self.exhausted is None and self.deadline is not None and self._clock() >= self.deadline:
            self.time_up()
        reason = self.exhausted
        if reason is not None:
            raise BudgetExhaustedError(f"budget exhausted ({reason})")

    def _estimate(self, model: str, prompt_chars: int, max_tokens: int | None) -> Hold:
        # The outermost ledger has seen every reply of the tree (a job: of every task).
        largest = self._chain[-1]._largest_completion
        prompt, completion = estimate_parts(prompt_chars, max_tokens, largest)
        tokens = prompt + completion
        price = lookup_price(self.prices, model)
        cost = (prompt * price[0] + completion * price[1]) / 1_000_000 if price else 0.0
        return Hold(tokens, cost, price)

    def _over(self) -> str | None:
        if self.max_tokens is not None and self.spent_tokens >= self.max_tokens:
            return f"{self._prefix}max_tokens={self.max_tokens}"
        if self.max_cost_usd is not None and self.spent_cost >= self.max_cost_usd:
            return f"{self._prefix}max_cost_usd={self.max_cost_usd:g}"
        return None

    def _fits(self) -> bool:
        if self.max_tokens is not None and self.spent_tokens + self._held_tokens >= self.max_tokens:
            return False
        return not (
            self.max_cost_usd is not None
            and self.spent_cost + self._held_cost >= self.max_cost_usd
        )

    async def reserve(self, model: str, prompt_chars: int, max_tokens: int | None) -> Hold | None:
        """Set aside an estimate for one call before it is sent (None: nothing to hold).

        Under a cost limit (here or on a parent), a model without a price raises
        ``UnpricedModelError``: its cost would count as $0 and the limit would not bind.
        """
        self.check()
        spenders = self._spenders
        if not spenders:
            return None
        hold = self._estimate(model, prompt_chars, max_tokens)
        if hold.price is None:
            capped = next((ledger for ledger in spenders if ledger.max_cost_usd is not None), None)
            if capped is not None:
                raise UnpricedModelError(
                    f"model {model!r} has no price, so {capped._prefix}max_cost_usd="
                    f"{capped.max_cost_usd:g} could not bound its cost; use a priced model or "
                    + PRICE_HELP.format(model=model)
                )
        while True:
            full = next((ledger for ledger in spenders if not ledger._fits()), None)
            if full is None:
                for ledger in spenders:
                    ledger._held_tokens += hold.tokens
                    ledger._held_cost += hold.cost
                    ledger._holds += 1
                return hold
            if not full._holds:
                # Nothing in flight can give room back: the settled usage is the limit.
                full.exhaust(full._over() or f"{full._prefix}max_tokens={full.max_tokens}")
            else:
                fut = asyncio.get_running_loop().create_future()
                with full._waiters_lock:
                    full._waiters.append(fut)
                await fut
            self.check()

    def settle(self, hold: Hold | None, model: str, prompt_tokens: int, completion_tokens: int,
               *, batch: bool = False) -> None:
        """Replace a hold by what the call really used (here and in every parent); a reply
        naming a model without a price is charged at the requested model's price;
        ``batch``: it was answered through a Batch API, at ``BATCH_DISCOUNT`` off."""
        price = lookup_price(self.prices, model) or (hold.price if hold is not None else None)
        tokens = prompt_tokens + completion_tokens
        cost = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000 if price else 0.0
        if batch:
            cost *= 1.0 - BATCH_DISCOUNT
        for ledger in self._chain:
            ledger._largest_completion = max(ledger._largest_completion, completion_tokens)
            ledger.spent_tokens += tokens
            ledger.spent_cost += cost
        self._drop(hold)
        for ledger in self._spenders:
            over = ledger._over()
            if over is not None:
                ledger.exhaust(over)

    def cancel(self, hold: Hold | None) -> None:
        """Drop a hold whose call got no reply (failed or cancelled): nothing was spent."""
        self._drop(hold)

    def _drop(self, hold: Hold | None) -> None:
        if hold is None:
            return
        for ledger in self._spenders:
            ledger._held_tokens -= hold.tokens
            ledger._held_cost -= hold.cost
            ledger._holds -= 1
            ledger._wake()

    def _wake(self) -> None:
        if not self._waiters:
            return  # a waiter appended after this check waits on holds, whose drop wakes it
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        for fut in waiters:
            # exhaust() may run on another thread than the waiter's loop (a run's
            # deadline timer fires on the loop the run was started on).
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                fut.get_loop().call_soon_threadsafe(_release, fut)


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# Runs started in a context where this is set also spend from it (a job's ledger): see
# ``spending_from``. A context variable, so concurrent jobs on one loop stay apart.
_OUTER: contextvars.ContextVar[BudgetLedger | None] = contextvars.ContextVar(
    "rlm_outer_budget", default=None
)


def outer_budget() -> BudgetLedger | None:
    """The ledger that runs started here also spend from (see ``spending_from``), or None."""
    return _OUTER.get()


@contextlib.contextmanager
def spending_from(ledger: BudgetLedger | None) -> Iterator[None]:
    """Every run started inside this block (and its children) draws from ``ledger`` as
    well as from its own budget, per model call: how a job's caps bind its tasks."""
    token = _OUTER.set(ledger)
    try:
        yield
    finally:
        _OUTER.reset(token)
