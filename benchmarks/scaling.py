"""How the balancer's cost grows: concurrency, upstream count and body size, each beside HAProxy.

Three tables, each a series of `lbsession bench` runs (round-robin, nginx upstreams,
wrk) that change one thing:

    connections   50, 1,000 and 9,900 concurrent keep-alive connections
    upstreams     3, 8 and 32 upstreams
    bodies        1 KB, 64 KB and 1 MB response bodies (MB/s through each proxy)

    python benchmarks/scaling.py                   # about 4 minutes
    python benchmarks/scaling.py --duration 3 --only bodies

Why 9,900 and not 10,000: a proxy that gives each client connection an upstream
connection of its own (HAProxy's and lbsession's `http-reuse safe`) needs two
open files per client, and this machine's hard limit is 20,000, which a process
cannot raise. `lbsession bench` raises the soft limit to the hard one, lbsession's
`max_connections` and HAProxy's `maxconn` above the run's connections, and
nginx's `worker_connections` to hold them; it refuses a run that cannot fit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

from lbsession.lab.bench import BenchParams, BenchReport, CaseReport, run_bench

SERIES: dict[str, list[tuple[str, dict[str, int]]]] = {
    "connections": [(f"{n:,} connections", {"connections": n}) for n in (50, 1000, 9900)],
    "upstreams": [(f"{n} upstreams", {"servers": n}) for n in (3, 8, 32)],
    "bodies": [(label, {"body_bytes": n}) for label, n in (("1 KB", 1024), ("64 KB", 65536), ("1 MB", 1 << 20))],
}
ROW = "{:<18}{:>10}{:>10}{:>8}{:>10}{:>10}{:>8}{:>11}{:>11}"


def row(label: str, case: CaseReport, body_bytes: int | None) -> str:
    """One line: CPU per request, p99 and MB/s of lbsession and HAProxy, with the ratios."""
    ours, theirs = case.lbsession, case.haproxy
    if theirs is None:
        return f"{label:<18}{ours.cpu_us_per_request:>10.1f}  (HAProxy not run)"
    size = body_bytes if body_bytes is not None else 3
    return ROW.format(
        label,
        f"{ours.cpu_us_per_request:.1f}",
        f"{theirs.cpu_us_per_request:.1f}",
        f"{case.cpu_ratio or 0:.2f}x",
        f"{ours.load.p99_ms:.2f}",
        f"{theirs.load.p99_ms:.2f}",
        f"{case.p99_ratio or 0:.2f}x",
        f"{ours.load.rps * size / 1e6:.1f}",
        f"{theirs.load.rps * size / 1e6:.1f}",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of each measured wrk run (default 5)")
    parser.add_argument("--only", choices=list(SERIES), action="append", help="run only this series (repeatable)")
    args = parser.parse_args()
    base = BenchParams(duration_s=args.duration, tool="wrk", haproxy="yes")
    for series in args.only or list(SERIES):
        print(f"\n{series}: lbsession (lbs) beside HAProxy (hap), round-robin, nginx upstreams")
        print(ROW.format("run", "CPU lbs", "CPU hap", "ratio", "p99 lbs", "p99 hap", "ratio", "MB/s lbs", "MB/s hap"))
        for label, change in SERIES[series]:
            params = dataclasses.replace(base, **change)  # type: ignore[arg-type]
            report: BenchReport = await run_bench(params)
            print(row(label, report.cases[0], params.body_bytes), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
