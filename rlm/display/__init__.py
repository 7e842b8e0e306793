"""Rendering a run for people: rich in a terminal, self-contained HTML in a notebook.

Nothing here takes part in a run. Everything reads events (see ``rlm.trajectory``) or
duck-typed result objects, and tolerates missing fields, so an old log, a killed run's
log or a half-built result still renders. One module per face, logic apart:

- ``formatting``, ``metrics``, ``tree``: tolerant readers, a run's summary, the run tree.
- ``terminal``: ``LiveDisplay`` (``verbose=True``) and ``render_log`` (``rlm view``).
- ``page`` (with ``markup``): ``trajectory_html`` / ``trajectory_fragment_html``.
- ``notebook``: ``result_html`` / ``result_rich`` / ``exec_result_html`` /
  ``exec_result_rich``, the faces of ``RLMResult`` and ``ExecResult``.
- ``progress``: ``BatchProgress`` (``acompletion_batch``) and sub-query batch lines.
"""

from rlm.display.notebook import exec_result_html, exec_result_rich, result_html, result_rich
from rlm.display.page import trajectory_fragment_html, trajectory_html
from rlm.display.progress import BatchProgress
from rlm.display.terminal import LiveDisplay, render_log

__all__ = [
    "BatchProgress",
    "LiveDisplay",
    "exec_result_html",
    "exec_result_rich",
    "render_log",
    "result_html",
    "result_rich",
    "trajectory_fragment_html",
    "trajectory_html",
]
