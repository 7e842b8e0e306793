"""A flat event list grouped into runs, iterations and cells, with each child run placed
in the parent cell that was running when it started (the shape the HTML page draws)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlm.display.formatting import CellNumbers, Event, as_int, as_num, as_text, depth_of, run_key


@dataclass
class Cell:
    number: int  # across the run, from 1, the way people refer to cells
    index: int | None = None  # within its iteration, as the events number it
    code: str | None = None
    result: Event | None = None
    children: list[Run] = field(default_factory=list)
    # Recorded sub-queries ({"prompt", "reply"}) the cell made, in order.
    sub_queries: list[Any] = field(default_factory=list)


@dataclass
class Iteration:
    number: int
    start_t: float | None = None
    end_t: float | None = None
    messages: list[Any] = field(default_factory=list)
    reply: Event | None = None
    cells: list[Cell] = field(default_factory=list)
    notes: list[Event] = field(default_factory=list)


@dataclass
class Run:
    key: str
    depth: int
    events: list[Event] = field(default_factory=list)
    start: Event | None = None
    iterations: list[Iteration] = field(default_factory=list)
    notes: list[Event] = field(default_factory=list)

    def iteration(self, number: int, t: float | None) -> Iteration:
        for it in self.iterations:
            if it.number == number:
                return it
        if self.iterations and t is not None and self.iterations[-1].end_t is None:
            self.iterations[-1].end_t = t
        it = Iteration(number, start_t=t)
        self.iterations.append(it)
        return it

    def open_cell(self) -> Cell | None:
        for it in reversed(self.iterations):
            for cell in reversed(it.cells):
                if cell.result is None:
                    return cell
        return None


def build_runs(events: list[Event]) -> list[Run]:
    """Group a flat event list into runs, iterations and cells; a child run goes inside
    the cell of its parent that was running when it started."""
    runs: dict[str, Run] = {}
    tops: list[Run] = []
    numbers = CellNumbers()
    for e in events:
        key, depth = run_key(e), depth_of(e)
        run = runs.get(key)
        if run is None:
            run = runs[key] = Run(key, depth)
            parent = None
            if depth > 0:
                parents = [r for r in runs.values() if r.depth == depth - 1 and r.open_cell()]
                parent = parents[-1].open_cell() if parents else None
            if parent is not None:
                parent.children.append(run)
            else:
                tops.append(run)
        run.events.append(e)
        kind = e.get("type")
        t = as_num(e.get("t"))
        number = as_int(e.get("iteration"))
        if kind == "sub_queries":
            calls = e.get("calls")
            cell = run.open_cell()
            if cell is not None and isinstance(calls, list):
                cell.sub_queries.extend(c for c in calls if isinstance(c, dict))
        elif kind == "run_start":
            run.start = e
        elif kind == "run_end":
            if run.iterations and run.iterations[-1].end_t is None:
                run.iterations[-1].end_t = t
        elif number is not None:
            it = run.iteration(number, t)
            if kind == "root_request":
                messages = e.get("messages")
                it.messages = list(messages) if isinstance(messages, list) else []
            elif kind == "root_reply":
                it.reply = e
            elif kind in ("cell", "cell_result"):
                index = as_int(e.get("index"))
                cell = next((c for c in it.cells if c.index == index), None)
                if cell is None:
                    cell = Cell(numbers.number(e), index)
                    it.cells.append(cell)
                if kind == "cell":
                    cell.code = as_text(e.get("code"))
                else:
                    cell.result = e
            else:
                it.notes.append(e)
        elif kind in ("final", "budget", "error"):
            run.notes.append(e)
    return tops


