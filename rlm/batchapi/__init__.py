"""Half-price calls through the providers' Batch APIs (OpenAI Batches, Anthropic Message
Batches).

- ``settings``: ``BatchSettings``, every knob of batch mode;
- ``wire``: each provider's batch endpoints (lines built and results parsed by the
  provider's adapter);
- ``collector``: one client's calls grouped into batch files, submitted, polled and
  dispatched by custom_id, with retries and the live fallback;
- ``handle``: the low-level API, ``AsyncOpenAIClient.submit_batch`` and
  ``completion_batch(..., batch_api=True)``;
- ``replay``: how a batch-mode job waits (tasks park and are replayed from the
  answers) and the client hook that serves their calls;
- ``journal``: a job's crash state.

The job that drives it all is ``rlm.jobs.batch`` (``rlm batch --batch-api``,
``RLM.run_job(..., batch_api=True)``). Importing this package imports no network code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlm.batchapi.settings import BatchSettings

if TYPE_CHECKING:
    from rlm.batchapi.handle import BatchHandle
    from rlm.batchapi.replay import BatchPending

__all__ = ["BatchHandle", "BatchPending", "BatchSettings"]


def __getattr__(name: str) -> Any:
    if name == "BatchHandle":
        from rlm.batchapi.handle import BatchHandle

        return BatchHandle
    if name == "BatchPending":
        from rlm.batchapi.replay import BatchPending

        return BatchPending
    raise AttributeError(f"module 'rlm.batchapi' has no attribute {name!r}")
