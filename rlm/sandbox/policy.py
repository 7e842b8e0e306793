"""Transitional re-exports of the sandbox policy's public names (kept for one release).

The policy is split by concept: ``compiler`` (compile_cell, PolicyError), ``guards``
(attribute guards), ``safe_builtins``, ``modules`` (facades, ALLOWED_MODULES),
``cells`` (build_namespace, run_cell, output, deadlines, error text) and
``subqueries`` (prompt and parameter checks, LLMQueryError). Import from those.
"""

from __future__ import annotations

from rlm.sandbox.cells import (
    CellStop,
    CellTimeout,
    OutputBuffer,
    build_namespace,
    format_user_error,
    run_cell,
    stop_requested,
    take_final,
    wait_for_future,
)
from rlm.sandbox.compiler import CompiledCell, PolicyError, compile_cell
from rlm.sandbox.guards import BLOCKED_ATTRIBUTES, CELL_MODULE, guarded_getattr
from rlm.sandbox.modules import ALLOWED_MODULES, ModuleFacade
from rlm.sandbox.subqueries import (
    FAILED_SLOT_PREFIX,
    SUBQUERY_PARAMS,
    LLMQueryError,
    check_subquery_params,
    check_subquery_prompt,
    count_failed_slots,
)

__all__ = [
    "ALLOWED_MODULES",
    "BLOCKED_ATTRIBUTES",
    "CELL_MODULE",
    "FAILED_SLOT_PREFIX",
    "SUBQUERY_PARAMS",
    "CellStop",
    "CellTimeout",
    "CompiledCell",
    "LLMQueryError",
    "ModuleFacade",
    "OutputBuffer",
    "PolicyError",
    "build_namespace",
    "check_subquery_params",
    "check_subquery_prompt",
    "compile_cell",
    "count_failed_slots",
    "format_user_error",
    "guarded_getattr",
    "run_cell",
    "stop_requested",
    "take_final",
    "wait_for_future",
]
