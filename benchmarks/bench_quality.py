"""``rlm bench run`` end to end against the fake server: wall time of the harness itself.

    python benchmarks/bench_quality.py            # 3 runs, each into a fresh directory
    python benchmarks/bench_quality.py --runs 1

Runs the issue's target command, ``rlm bench run --tasks niah,oolong --lengths 8k,32k
--n 3 --methods rlm,direct``, as a real subprocess against a FakeLLMServer (on a thread
of this process) whose root model solves bench tasks in the sandbox and whose direct
call solves the prompt it is sent (tests/bench_support.py). The fake models are right
by construction, so every score is 1.000: the numbers measure the harness (task
generation, the sandbox, sub-query fan-out, results, reports), not a model. Prices are
GPT-5's and GPT-5-mini's list prices so the cost columns show what the token counts
would cost. Target: under 60 s. Writes benchmarks/results/bench_quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine_info, median, write_json

sys.path.insert(0, str(ROOT / "tests"))
from bench_support import ROOT as ROOT_MODEL  # noqa: E402 - test support, found via tests/
from bench_support import SUB as SUB_MODEL  # noqa: E402
from bench_support import bench_server  # noqa: E402

TARGET_S = 60.0
ARGS = ["--tasks", "niah,oolong", "--lengths", "8k,32k", "--n", "3", "--methods", "rlm,direct"]
PRICES = ["--price", f"{ROOT_MODEL}=1.25,10", "--price", f"{SUB_MODEL}=0.25,2"]


def run_once(url: str, out: Path) -> dict[str, Any]:
    """One ``rlm bench run`` into ``out``: wall time, exit code, the summary rows."""
    cmd = [sys.executable, "-m", "rlm", "bench", "run", "--out", str(out), *ARGS,
           "--model", ROOT_MODEL, "--recursive-model", SUB_MODEL, "--base-url", url,
           "--api-key", "offline", *PRICES]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text()) if proc.returncode == 0 else {}
    return {"wall_s": wall, "exit_code": proc.returncode, "table": proc.stdout,
            "stderr_tail": proc.stderr[-500:], "rows": summary.get("rows", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh runs (default 3)")
    args = parser.parse_args()
    runs = []
    with bench_server() as server, tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            runs.append(run_once(server.url, Path(tmp) / f"run{i}"))
            print(f"run {i + 1}: {runs[-1]['wall_s']:.1f} s, exit {runs[-1]['exit_code']}",
                  file=sys.stderr)
        requests = server.requests
    walls = [r["wall_s"] for r in runs]
    mid = median(walls)
    print(runs[-1]["table"])
    print(f"wall time, median of {len(walls)}: {mid:.1f} s (runs: "
          f"{', '.join(f'{w:.1f}' for w in walls)}); target under {TARGET_S:g} s: "
          f"{'PASS' if mid is not None and mid < TARGET_S else 'MISSED'}")
    data = {
        "benchmark": "bench_quality",
        "machine": machine_info(),
        "command": "rlm bench run " + " ".join(ARGS),
        "wall_s": walls,
        "wall_s_median": mid,
        "target_s": TARGET_S,
        "passed": mid is not None and mid < TARGET_S and all(r["exit_code"] == 0 for r in runs),
        "fake_server_requests": requests,
        "rows": runs[-1]["rows"],
    }
    print(f"wrote {write_json('bench_quality.json', data)}")
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
