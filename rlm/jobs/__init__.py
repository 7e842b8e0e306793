"""The many-document job: ``rlm batch`` and ``RLM.run_job``.

``tasks`` reads the inputs (JSONL, a directory, CSV) with contexts loaded lazily,
``output`` is the resumable JSONL result file, ``budget`` the job-level ledger,
``progress`` the stderr bar, ``runner`` ties them together, and ``local`` and
``ray_backend`` run the tasks in this process or on a Ray cluster.
"""

from rlm.jobs.runner import JobSummary, arun_job, load_tasks, run_job
from rlm.jobs.tasks import Task

__all__ = ["JobSummary", "Task", "arun_job", "load_tasks", "run_job"]
