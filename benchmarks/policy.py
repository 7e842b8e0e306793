"""Policy-layer cost: what the sandbox's guards add to everyday cell code, in-process.

    python benchmarks/policy.py            # 7 rounds per workload
    python benchmarks/policy.py --quick    # 3 rounds

Each workload is one cell run through ``REPLEnv(sandbox="local").execute``; the table
shows the median CPU time the cell's own code took (``time.process_time`` read inside
the cell, so a loaded machine's waiting does not count) over the rounds. Workloads stress the guarded paths: an
empty cell, attribute reads through the attribute guard, prints, class statements (the
class-creation guard), match statements with class patterns (the match guard), and a
batch of 100,000 prompts converted to plain data at the sandbox boundary (the env has
no client, so the call stops right after the conversion). Compare two checkouts by
running the script in each. Results: benchmarks/results/policy.json.
"""

from __future__ import annotations

import argparse

from _common import machine_info, median, write_json

from rlm import REPLEnv

WORKLOADS = {
    "empty cell": "pass",
    "300k guarded attribute reads": (
        "class P:\n    def __init__(self):\n        self.a = 1\np = P()\n"
        "for i in range(300_000):\n    p.a"
    ),
    "100k prints": "for i in range(100_000):\n    print(i)",
    "10k class statements": "for i in range(10_000):\n    class K:\n        pass",
    "100k match class patterns": (
        "import dataclasses\n@dataclasses.dataclass\nclass Pt:\n    x: int\n    y: int\n"
        "pts = [Pt(i, i) for i in range(100_000)]\nn = 0\nfor p in pts:\n"
        "    match p:\n        case Pt(x, y=0):\n            n -= 1\n        case Pt(x, y):\n            n += 1"
    ),
    "batch of 100k prompts (conversion)": (
        "prompts = ['ECHO %d' % i for i in range(100_000)]\n"
        "try:\n    llm_query_batch(prompts)\nexcept LLMQueryError:\n    pass"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    results: dict[str, float | None] = {}
    with REPLEnv(context="c", sandbox="local", timeout=120, max_output_chars=1000) as env:
        env.execute("x = 1")  # warm-up: thread, namespace, first compile
        for name, code in WORKLOADS.items():
            times = []
            for _ in range(rounds):
                r = env.execute(
                    "import time as bench_t\nbench_c0 = bench_t.process_time()\n" + code
                    + "\nbench_cpu = bench_t.process_time() - bench_c0"
                )
                assert r.error is None, r.error
                times.append(env.get("bench_cpu"))
            results[name] = median(times)
    print(f"{'workload':40} {'CPU, median':>12}")
    for name, value in results.items():
        shown = "-" if value is None else f"{value * 1000:.1f} ms"
        print(f"{name:40} {shown:>12}")
    path = write_json(
        "policy.json",
        {"machine": machine_info(), "rounds": rounds, "median_cpu_s": results},
    )
    print(f"(shared 2-core machine: compare ratios, not absolute times) -> {path}")


if __name__ == "__main__":
    main()
