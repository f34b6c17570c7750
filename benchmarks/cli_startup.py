"""How long the command line takes to answer when it needs no model: ``--help``, ``--version``,
``segment --help``; and how long it takes to say its first word when it does.

    python -m benchmarks.cli_startup [--runs 10]

Each measurement is a fresh process of the installed ``seggpt-jax`` console script, timed from start
to exit (median and max over ``--runs``). The last row starts ``segment`` on a missing input: the time
to its one-line error, which is reported before JAX starts. Results are appended to
benchmarks/results/cli-startup-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "seggpt-jax --help": ["--help"],
    "seggpt-jax --version": ["--version"],
    "seggpt-jax segment --help": ["segment", "--help"],
    "segment, error before any work": ["segment", "missing.jpg", "--prompt-image", "p.jpg", "--prompt-mask", "m.png",
                                       "--out-dir", "out"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    script = os.path.join(os.path.dirname(sys.executable), "seggpt-jax")
    rows = []
    for name, argv in CASES.items():
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([script, *argv], capture_output=True, cwd=REPO, check=False)
            times.append(time.perf_counter() - start)
        rows.append({"case": name, "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)})
        print(f"{name:<34} median {rows[-1]['median_s']:.3f} s   max {rows[-1]['max_s']:.3f} s")
    avx512 = "avx512f" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None
    record = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "avx512": avx512, "python": platform.python_version(), "runs": args.runs, "rows": rows}
    out = os.path.join(REPO, "benchmarks", "results", f"cli-startup-{record['date']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
