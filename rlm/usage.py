"""Usage, prices and the per-run budget ledger.

- ``Usage``/``ModelUsage``: immutable snapshots (calls, tokens, cost, retries) that
  add up and print readably; a model without a price shows "unpriced", never $0.
- ``UsageMeter``: thread-safe counters with a price table; each client has one and
  each run passes its own along with every call, so runs sharing a client still get
  exact usage of their own.
- Prices: ``Price`` per model (input, output, cached input, cache write, batch
  discount), from the built-in table, a JSON prices file (``RLM_PRICES`` names one),
  and ``prices=`` mappings, merged in that order; an ``(in, out)`` pair or a dict works
  wherever a user gives one, and ``parse_price`` reads ``MODEL=IN,OUT``. A call costs
  each kind of token at its price: uncached input, prompt-cache reads and writes, output.
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
from typing import Any, TypeVar

from rlm.errors import BudgetExhaustedError, ConfigError, UnpricedModelError

PRICES_ENV = "RLM_PRICES"


@dataclass(frozen=True, slots=True)
class Price:
    """What one model costs, in USD per 1M tokens.

    ``input`` is the list price of prompt tokens, ``output`` of completion tokens
    (reasoning tokens included). ``cached_input`` is what prompt tokens read from the
    provider's prompt cache cost, ``cache_write`` what prompt tokens written to it cost
    (Anthropic's ``cache_creation_input_tokens``); either defaults to ``input``.
    ``batch_discount`` is the share taken off calls answered through a Batch API (0.5:
    half price). A price table maps model names to these; wherever a user gives prices,
    an ``(input, output)`` pair or a dict with these field names works too.
    """

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None
    batch_discount: float = 0.5

    def __post_init__(self) -> None:
        # Resolved once, so equal prices compare equal and every reader sees numbers.
        if self.cached_input is None:
            object.__setattr__(self, "cached_input", self.input)
        if self.cache_write is None:
            object.__setattr__(self, "cache_write", self.input)
        # Checked here, so a Price built in code is as sound as a parsed one and tables
        # of them pass through without another look.
        values = (self.input, self.output, self.cached_input, self.cache_write,
                  self.batch_discount)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                   and math.isfinite(v) for v in values) or self.batch_discount >= 1:
            raise ConfigError(
                f"a Price takes numbers >= 0 in USD per 1M tokens and a batch_discount "
                f"below 1, not {self!r}"
            )

    def cost(self, prompt_tokens: int, completion_tokens: int, *, cached_input_tokens: int = 0,
             cache_creation_tokens: int = 0, batch: bool = False) -> float:
        """USD for one call: the uncached prompt tokens at ``input``, cache reads at
        ``cached_input``, cache writes at ``cache_write`` and completion tokens at
        ``output``; ``batch``: less ``batch_discount``. ``prompt_tokens`` include the
        cached and written ones, as the providers report them."""
        cached = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        read = min(cached_input_tokens, prompt_tokens)
        written = min(cache_creation_tokens, prompt_tokens - read)
        usd = ((prompt_tokens - read - written) * self.input + read * cached + written * write
               + completion_tokens * self.output) / 1_000_000
        return usd * (1.0 - self.batch_discount) if batch else usd

    def list_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for a call at list price: every prompt token at ``input``, no discount."""
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000

# What a user may give as one model's price: a Price, an (input, output) pair, or a dict
# of Price's field names.
PriceSpec = Price | tuple[float, float] | list[float] | Mapping[str, float]

# USD per 1M tokens, from the providers' public price lists: (input, output) pairs, or
# dicts with Price's field names where a model has more to say (OpenAI's cached-input
# prices). Matched by exact name, or as a dated snapshot of a listed name
# ("gpt-4o-mini-2024-07-18" costs what "gpt-4o-mini" does); a snapshot priced
# differently is listed under its own name. Claude models read from and write to the
# prompt cache at Anthropic's multipliers unless an entry says otherwise (see
# ``to_price``).
DEFAULT_PRICES: dict[str, PriceSpec] = {
    "gpt-4o": {"input": 2.50, "output": 10.00, "cached_input": 1.25},
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": {"input": 0.15, "output": 0.60, "cached_input": 0.075},
    "gpt-4.1": {"input": 2.00, "output": 8.00, "cached_input": 0.50},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60, "cached_input": 0.10},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40, "cached_input": 0.025},
    "gpt-5": {"input": 1.25, "output": 10.00, "cached_input": 0.125},
    "gpt-5-mini": {"input": 0.25, "output": 2.00, "cached_input": 0.025},
    "gpt-5-nano": {"input": 0.05, "output": 0.40, "cached_input": 0.005},
    "o3": {"input": 2.00, "output": 8.00, "cached_input": 0.50},
    "o3-mini": {"input": 1.10, "output": 4.40, "cached_input": 0.55},
    "o4-mini": {"input": 1.10, "output": 4.40, "cached_input": 0.275},
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

# Anthropic bills prompt-cache reads at 0.1x and writes (5-minute cache) at 1.25x input.
ANTHROPIC_CACHE_READ = 0.1
ANTHROPIC_CACHE_WRITE = 1.25

# Decimal places of USD amounts in JSON output: a millionth of a dollar.
COST_DECIMALS = 6

PRICE_HELP = (
    "give it a price: RLM(prices={{{model!r}: (usd_per_1M_in, usd_per_1M_out)}}), "
    "rlm run --price {model}=IN,OUT or --prices FILE.json, or a prices file named by "
    f"{PRICES_ENV}"
)

_PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "batch_discount")


# -- prices ------------------------------------------------------------------------


def _is_claude(model: str) -> bool:
    return model.rpartition("/")[2].startswith("claude")


def _number(model: str, name: str, value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (number >= 0 and math.isfinite(number)):
        raise ConfigError(
            f"the {name} price of {model!r} in {where} must be a number >= 0 (USD per 1M "
            f"tokens), not {value!r}"
        )
    return number


def to_price(model: str, value: Any, where: str = "prices") -> Price:
    """One table entry as a ``Price``: a ``Price``, an ``(input, output)`` pair or a dict
    of Price's field names (``input`` and ``output`` required); ConfigError if bad.

    A Claude model's missing ``cached_input`` and ``cache_write`` follow Anthropic's
    rule (0.1x and 1.25x ``input``); other models' default to ``input``.
    """
    if isinstance(value, Price):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in _PRICE_FIELDS)
        if unknown or "input" not in value or "output" not in value:
            what = f"has unknown fields {unknown}" if unknown else "lacks input or output"
            raise ConfigError(
                f"the price of {model!r} in {where} {what}: give "
                '{"input": IN, "output": OUT} in USD per 1M tokens, optionally with '
                '"cached_input", "cache_write" and "batch_discount"'
            )
        fields_ = {name: _number(model, name, value[name], where)
                   for name in _PRICE_FIELDS if value.get(name) is not None}
    else:
        try:
            pin, pout = value
        except (TypeError, ValueError):
            raise ConfigError(
                f"the price of {model!r} in {where} must be [usd_per_1M_in, usd_per_1M_out] "
                f'or {{"input": ..., "output": ...}}, not {value!r}'
            ) from None
        fields_ = {"input": _number(model, "input", pin, where),
                   "output": _number(model, "output", pout, where)}
    discount = fields_.get("batch_discount", 0.5)
    if discount >= 1:
        raise ConfigError(
            f"the batch_discount of {model!r} in {where} is the share taken off list price: "
            f"a number from 0 to below 1 (0.5 is half price), not {discount!r}"
        )
    if _is_claude(model):
        fields_.setdefault("cached_input", fields_["input"] * ANTHROPIC_CACHE_READ)
        fields_.setdefault("cache_write", fields_["input"] * ANTHROPIC_CACHE_WRITE)
    return Price(**fields_)


def check_prices(prices: Mapping[str, Any], where: str = "prices") -> dict[str, Price]:
    """Validate a price table (``{model: Price | (in, out) | {"input": ..}}``) into
    ``{model: Price}``; ConfigError naming the bad entry."""
    if not isinstance(prices, Mapping):
        raise ConfigError(f"{where} must map model names to (usd_per_1M_in, usd_per_1M_out)")
    return {str(m): to_price(str(m), v, where) for m, v in prices.items()}


def load_prices_file(path: str | os.PathLike[str]) -> dict[str, Price]:
    """Read a JSON prices file: ``{"model": [in, out] or {"input": .., "output": ..,
    "cached_input": .., "cache_write": .., "batch_discount": ..}, ...}`` in USD per 1M
    tokens."""
    where = f"prices file {os.fspath(path)}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    return check_prices(data, where)


def parse_price(spec: str) -> tuple[str, Price]:
    """Parse ``MODEL=IN,OUT`` (USD per 1M input and output tokens) into a table entry."""
    model, sep, pair = spec.rpartition("=")
    parts = pair.split(",")
    if not sep or not model or len(parts) != 2:
        raise ConfigError(
            f"a price is MODEL=IN,OUT in USD per 1M tokens (e.g. my-model=0.15,0.60), not {spec!r}"
        )
    return model, to_price(model, parts, "--price")


def resolve_prices(explicit: Mapping[str, Any] | None = None) -> dict[str, Price]:
    """The built-in table, then the file named by ``RLM_PRICES``, then ``explicit``."""
    table = check_prices(DEFAULT_PRICES, "the built-in price table")
    path = os.environ.get(PRICES_ENV)
    if path:
        table.update(load_prices_file(path))
    if explicit:
        table.update(check_prices(explicit))
    return table


_Entry = TypeVar("_Entry")

# OpenAI's dated snapshots: the documented family a price extends to.
_SNAPSHOT = re.compile(r"(?P<base>.+)-\d{4}-\d{2}-\d{2}")


def lookup_price(prices: Mapping[str, _Entry], model: str) -> _Entry | None:
    """A model's entry by exact name, else as a dated snapshot of a priced model
    (``NAME-YYYY-MM-DD``), else None. Never by a shared prefix: ``o3-pro`` is another
    model than ``o3``, at another price. Over a checked table (``check_prices``) the
    entry is a ``Price``."""
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


def _share(part: int, whole: int) -> float:
    return part / whole if whole > 0 else 0.0


def token_details(reply: Any) -> dict[str, int]:
    """The prompt-cache token counts of a reply (zero where it carries none, e.g. a reply
    read back from the sub-query cache), as keywords for ``record``, ``cached`` and
    ``settle``."""
    return {
        "cached_input_tokens": int(getattr(reply, "cached_input_tokens", 0) or 0),
        "cache_creation_tokens": int(getattr(reply, "cache_creation_tokens", 0) or 0),
    }


@dataclass(frozen=True)
class ModelUsage:
    """Counters for one model: calls that returned, tokens, and USD cost.

    ``priced`` is False when the model has no price, so ``cost_usd`` is unknown (0.0
    here, shown as "unpriced"). ``cached_calls`` were answered by the sub-query cache
    (or joined an identical request in flight) without a request of their own: they
    are not in ``calls`` or the tokens; ``saved_tokens`` and ``saved_usd`` are what
    they would have cost. ``estimated_calls`` of the calls came back without usage from
    the server: their tokens are the conservative estimate made before sending.

    Of ``prompt_tokens``, ``cached_input_tokens`` were read from the provider's prompt
    cache and ``cache_creation_tokens`` written to it; of ``completion_tokens``,
    ``reasoning_tokens`` were the model's hidden reasoning. ``batch_calls`` were answered
    through a Batch API, and ``batch_saved_usd`` is what they would have cost live less
    what they cost. ``cost_usd`` is what was paid: each kind of token at its price.
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
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    batch_calls: int = 0
    batch_saved_usd: float = 0.0

    @property
    def cached_share(self) -> float:
        """The share of prompt tokens read from the provider's prompt cache (0 to 1)."""
        return _share(self.cached_input_tokens, self.prompt_tokens)

    def __add__(self, other: ModelUsage) -> ModelUsage:
        return ModelUsage(
            **{name: getattr(self, name) + getattr(other, name) for name in _MODEL_SUMMED},
            priced=self.priced and other.priced,
        )

    def __sub__(self, other: ModelUsage) -> ModelUsage:
        """The usage between two snapshots of the same model's counters."""
        return ModelUsage(
            **{name: getattr(self, name) - getattr(other, name) for name in _MODEL_SUMMED},
            priced=self.priced,
        )

    def __repr__(self) -> str:
        cost = f"${self.cost_usd:.4f}" if self.priced else "unpriced"
        return (
            f"ModelUsage(calls={self.calls:,}, tokens={self.total_tokens:,} "
            f"(in {self.prompt_tokens:,}, out {self.completion_tokens:,}), cost={cost}"
            f"{_savings_text(self)}"
            f"{_cached_text(self.cached_calls, self.saved_usd, self.saved_tokens, self.priced)})"
        )


_MODEL_SUMMED = tuple(f.name for f in fields(ModelUsage) if f.name != "priced")


def _savings_text(usage: ModelUsage | Usage) -> str:
    """The prompt-cache, reasoning and Batch API part of a usage repr ("" when none)."""
    bits = []
    if usage.cached_input_tokens:
        bits.append(f"cached_input={usage.cached_input_tokens:,} ({usage.cached_share:.0%})")
    if usage.cache_creation_tokens:
        bits.append(f"cache_writes={usage.cache_creation_tokens:,}")
    if usage.reasoning_tokens:
        bits.append(f"reasoning={usage.reasoning_tokens:,}")
    if usage.batch_calls:
        bits.append(f"batch_calls={usage.batch_calls:,} (saved ${usage.batch_saved_usd:.4f})")
    return "".join(f", {bit}" for bit in bits)


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
    pacing, and the waits refusals asked for, summed over calls),
    ``estimated_calls`` (calls that came back without usage: their tokens are the
    estimate made before sending), ``cached_input_tokens`` and
    ``cache_creation_tokens`` (prompt tokens read from and written to the provider's
    prompt cache, priced as such), ``reasoning_tokens`` (completion tokens spent on
    hidden reasoning), ``batch_calls`` (calls answered through a Batch API) and
    ``batch_saved_usd`` (what those would have cost live, less what they cost).

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
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    batch_calls: int = 0
    batch_saved_usd: float = 0.0

    @property
    def cached_share(self) -> float:
        """The share of prompt tokens read from the provider's prompt cache (0 to 1)."""
        return _share(self.cached_input_tokens, self.prompt_tokens)

    def __add__(self, other: Usage) -> Usage:
        by_model = dict(self.by_model)
        for name, mu in other.by_model.items():
            by_model[name] = by_model[name] + mu if name in by_model else mu
        return Usage(
            **{name: getattr(self, name) + getattr(other, name) for name in _USAGE_FIELDS},
            by_model=by_model,
        )

    def __sub__(self, other: Usage) -> Usage:
        """The usage between two snapshots of the same meter (``after - before``)."""
        by_model = {}
        for name, mu in self.by_model.items():
            diff = mu - other.by_model.get(name, ModelUsage())
            if diff.calls or diff.total_tokens or diff.cached_calls:
                by_model[name] = diff
        return Usage(
            **{name: getattr(self, name) - getattr(other, name) for name in _USAGE_FIELDS},
            by_model=by_model,
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
            for name in ("cost_usd", "saved_usd", "batch_saved_usd"):
                row[name] = round(row[name], COST_DECIMALS)
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
        return f"Usage({', '.join(bits)}{_savings_text(self)}{cached})"

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
        for part in savings_parts(self):
            footer += f" · {part}"
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


def savings_parts(usage: ModelUsage | Usage) -> list[str]:
    """What prompt caching, reasoning and Batch APIs did, as people read it ("cached
    input 62% of prompt tokens", "reasoning 1,024 tokens", "batch saved $0.0210"); only
    the non-zero ones, so most runs show none."""
    parts = []
    if usage.cached_input_tokens:
        parts.append(f"cached input {usage.cached_share:.0%} of prompt tokens")
    if usage.cache_creation_tokens:
        parts.append(f"cache writes {usage.cache_creation_tokens:,} tokens")
    if usage.reasoning_tokens:
        parts.append(f"reasoning {usage.reasoning_tokens:,} tokens")
    if usage.batch_calls:
        parts.append(f"batch saved ${usage.batch_saved_usd:.4f} on {usage.batch_calls:,} calls")
    return parts


def event_usage(usage: Usage) -> dict[str, Any]:
    """One step's usage as a trajectory event holds it: tokens, their prompt-cache and
    reasoning parts, what a Batch API saved (when it answered), and the cost ("unpriced"
    for a model without a price, never a misleading 0)."""
    data: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_creation_tokens": usage.cache_creation_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cost_usd": round(usage.cost_usd, COST_DECIMALS) if not usage.unpriced_models
        else "unpriced",
    }
    if usage.batch_calls:
        data["batch_saved_usd"] = round(usage.batch_saved_usd, COST_DECIMALS)
    return data


class _Row:
    """One model's mutable counters inside a meter (the meter's lock guards them)."""

    __slots__ = ("batch_calls", "batch_saved", "cache_created", "cached_calls", "cached_input",
                 "calls", "completion", "cost", "estimated", "priced", "prompt", "reasoning",
                 "saved", "saved_tokens")

    def __init__(self, priced: bool) -> None:
        self.priced = priced
        self.calls = self.prompt = self.completion = self.estimated = 0
        self.cached_calls = self.saved_tokens = 0
        self.cached_input = self.cache_created = self.reasoning = self.batch_calls = 0
        self.cost = self.saved = self.batch_saved = 0.0

    def snapshot(self) -> ModelUsage:
        return ModelUsage(
            self.calls, self.prompt, self.completion, self.prompt + self.completion,
            self.cost, self.priced, self.cached_calls, self.saved_tokens, self.saved,
            self.estimated, self.cached_input, self.cache_created, self.reasoning,
            self.batch_calls, self.batch_saved,
        )


class UsageMeter:
    """Thread-safe usage counters with a price table; ``snapshot()`` gives a ``Usage``.

    ``on_retry``, when given, is called with each retry's notice (on the engine loop),
    so a run's live view can show retries as they happen.
    """

    def __init__(self, prices: Mapping[str, PriceSpec],
                 on_retry: Callable[[Any], None] | None = None) -> None:
        self.prices: dict[str, Price] = check_prices(prices)
        self.on_retry = on_retry
        self._lock = threading.Lock()
        self._models: dict[str, _Row] = {}
        self._failed = 0
        self._retries = 0
        self._refusals = 0
        self._waited = 0.0

    def price(self, model: str) -> Price | None:
        """The price this meter uses for ``model`` (None: unpriced)."""
        return lookup_price(self.prices, model)

    def record(self, model: str, prompt_tokens: int, completion_tokens: int,
               estimated: bool = False, *, batch: bool = False, cached_input_tokens: int = 0,
               cache_creation_tokens: int = 0, reasoning_tokens: int = 0) -> None:
        """Count one call that returned, with its tokens (and cost, when priced);
        ``estimated``: the server reported no usage, these are estimates; ``batch``: it
        was answered through a Batch API, at the model's ``batch_discount`` off; of the
        prompt tokens, ``cached_input_tokens`` were read from the provider's prompt cache
        and ``cache_creation_tokens`` written to it (each at its price); of the
        completion tokens, ``reasoning_tokens`` were reasoning."""
        price = self.price(model)
        cost = saved = 0.0
        if price:
            cost = price.cost(prompt_tokens, completion_tokens, batch=batch,
                              cached_input_tokens=cached_input_tokens,
                              cache_creation_tokens=cache_creation_tokens)
            if batch:
                saved = price.cost(prompt_tokens, completion_tokens,
                                   cached_input_tokens=cached_input_tokens,
                                   cache_creation_tokens=cache_creation_tokens) - cost
        with self._lock:
            row = self._row(model, price)
            row.calls += 1
            row.prompt += prompt_tokens
            row.completion += completion_tokens
            row.cost += cost
            row.estimated += estimated
            row.cached_input += cached_input_tokens
            row.cache_created += cache_creation_tokens
            row.reasoning += reasoning_tokens
            if batch:
                row.batch_calls += 1
                row.batch_saved += saved

    def record_reply(self, reply: Any, *, batch: bool = False) -> None:
        """``record`` one reply: its model, tokens, prompt-cache and reasoning counts, and
        whether the server reported usage at all."""
        self.record(reply.model, reply.prompt_tokens, reply.completion_tokens,
                    not getattr(reply, "usage_reported", True), batch=batch,
                    reasoning_tokens=int(getattr(reply, "reasoning_tokens", 0) or 0),
                    **token_details(reply))

    def cached(self, model: str, prompt_tokens: int, completion_tokens: int, calls: int = 1,
               *, cached_input_tokens: int = 0, cache_creation_tokens: int = 0) -> None:
        """Count ``calls`` calls the cache answered, with the tokens they would have
        used (summed over them) and so what they saved; nothing is spent."""
        price = self.price(model)
        saved = 0.0
        if price:
            saved = price.cost(prompt_tokens, completion_tokens,
                               cached_input_tokens=cached_input_tokens,
                               cache_creation_tokens=cache_creation_tokens)
        with self._lock:
            row = self._row(model, price)
            row.cached_calls += calls
            row.saved_tokens += prompt_tokens + completion_tokens
            row.saved += saved

    def _row(self, model: str, price: Price | None) -> _Row:
        # The caller holds the lock.
        row = self._models.get(model)
        if row is None:
            row = self._models[model] = _Row(price is not None)
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
            by_model = {m: row.snapshot() for m, row in self._models.items()}
            failed, retries = self._failed, self._retries
            refusals, waited = self._refusals, self._waited
        total = sum(by_model.values(), ModelUsage())
        return Usage(
            **{name: getattr(total, name) for name in _USAGE_FROM_MODELS},
            failed_calls=failed,
            retries=retries,
            by_model=by_model,
            rate_limit_hits=refusals,
            rate_limit_wait_s=waited,
        )


# Usage's totals that are sums over its models.
_USAGE_FROM_MODELS = tuple(name for name in _USAGE_FIELDS if name in _MODEL_SUMMED)


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
    price: Price | None = None


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
        prices: Mapping[str, PriceSpec] | None = None,
        clock: Callable[[], float] = time.monotonic,
        parent: BudgetLedger | None = None,
        name: str = "",
    ) -> None:
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.max_time_s = max_time_s
        self.prices = check_prices(prices if prices is not None else DEFAULT_PRICES)
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
        # At list price: a reservation cannot know what the prompt cache will serve.
        cost = price.list_cost(prompt, completion) if price else 0.0
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
               *, batch: bool = False, cached_input_tokens: int = 0,
               cache_creation_tokens: int = 0) -> None:
        """Replace a hold by what the call really used (here and in every parent), at
        the real price: prompt-cache reads and writes at theirs, and ``batch`` (answered
        through a Batch API) at the model's ``batch_discount`` off. A reply naming a model
        without a price is charged at the requested model's price."""
        price = lookup_price(self.prices, model) or (hold.price if hold is not None else None)
        tokens = prompt_tokens + completion_tokens
        cost = price.cost(prompt_tokens, completion_tokens, batch=batch,
                          cached_input_tokens=cached_input_tokens,
                          cache_creation_tokens=cache_creation_tokens) if price else 0.0
        for ledger in self._chain:
            ledger._largest_completion = max(ledger._largest_completion, completion_tokens)
            ledger.spent_tokens += tokens
            ledger.spent_cost += cost
        self._drop(hold)
        for ledger in self._spenders:
            over = ledger._over()
            if over is not None:
                ledger.exhaust(over)

    def settle_reply(self, hold: Hold | None, reply: Any, *, batch: bool = False) -> None:
        """``settle`` one reply: its model, tokens and prompt-cache counts."""
        self.settle(hold, reply.model, reply.prompt_tokens, reply.completion_tokens,
                    batch=batch, **token_details(reply))

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
