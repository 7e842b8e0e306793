"""Memory of a many-document job: 2,000 tasks of 5 MB each, peak RSS of the process.

Every task names its context by ``context_path`` (the same 5 MB file, read anew for
each task, so each task holds its own 5 MB string exactly as with distinct files,
without 10 GB of disk), and some tasks instead carry a 5 MB inline context in the
JSONL (re-read from its line when the task starts; every 50th, to keep the file at 200 MB). The root model reads the context's
length and answers; the fake server runs in this process with no latency. Peak RSS
should stay near ``concurrency x context size`` above the start, not
``tasks x context size`` (10 GB).

    python benchmarks/job_memory.py [--tasks 2000] [--mb 5] [--concurrency 16] [--sandbox local]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--mb", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sandbox", choices=["local", "process"], default="local")
    parser.add_argument("--inline-every", type=int, default=50,
                        help="every n-th task carries its context inline in the JSONL (0: none)")
    args = parser.parse_args()

    from rlm import RLM
    from rlm.testing import FakeLLMServer

    answer = "```repl\nFINAL(str(len(context)))\n```"
    line = "x" * 99 + "\n"
    text = line * int(args.mb * 1024 * 1024 / len(line))
    with tempfile.TemporaryDirectory() as tmp, FakeLLMServer(scripts={"root": [answer]}) as srv:
        doc = Path(tmp) / "doc.txt"
        doc.write_text(text)
        tasks_file = Path(tmp) / "tasks.jsonl"
        with tasks_file.open("w") as fh:
            for i in range(args.tasks):
                if args.inline_every and i % args.inline_every == 0:
                    item = {"id": i, "query": "how long?", "context": text}
                else:
                    item = {"id": i, "query": "how long?", "context_path": str(doc)}
                fh.write(json.dumps(item) + "\n")
        rlm = RLM(model="root", base_url=srv.url, api_key="bench", sandbox=args.sandbox)
        rlm.completion(context="warm-up", query="how long?")
        base = rss_mb()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        summary = rlm.run_job(str(tasks_file), Path(tmp) / "out.jsonl",
                              concurrency=args.concurrency, progress=False)
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        answers = {json.loads(x)["answer"] for x in (Path(tmp) / "out.jsonl").read_text().splitlines()}
        rlm.close()
    context_mb = len(text) / 1024 / 1024
    result = {
        "tasks": args.tasks, "context_mb": round(context_mb, 2), "concurrency": args.concurrency,
        "sandbox": args.sandbox, "done": summary.done, "failed": summary.failed,
        "answers_right": answers == {str(len(text))},
        "rss_before_job_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
        "peak_before_job_mb": round(peak_before, 1),
        "growth_mb": round(peak - base, 1),
        "growth_per_concurrent_context": round((peak - base) / (args.concurrency * context_mb), 2),
        "all_contexts_mb": round(args.tasks * context_mb, 1), "wall_s": round(wall, 1),
    }
    print(json.dumps(result, indent=2))
    write_json(f"job_memory-{args.sandbox}.json", {"machine": machine_info(), "result": result})
    return 0 if summary.done == args.tasks and result["answers_right"] else 1


if __name__ == "__main__":
    sys.exit(main())
