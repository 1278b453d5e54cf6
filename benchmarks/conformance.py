"""The conformance table side by side: lbsession and, where it is installed, HAProxy on the same bytes.

Runs every case of the test suite's table (tests/integration/conformance_table.py: the
same scripted upstream, the same judge) against `lbsession lb` and `haproxy`, each a
real process in front of a fresh scripted upstream per case, and prints one row per
case: the verdict RFC 9110/9112 ask for, then each proxy's result ("ok" and the
status the client got, or "NO" and the first check that failed). A report, not a
test: a difference is a fact to read, not a failure.

    PYTHONPATH=$PWD python benchmarks/conformance.py              # HAProxy too when installed
    PYTHONPATH=$PWD python benchmarks/conformance.py --haproxy no
    PYTHONPATH=$PWD python benchmarks/conformance.py --json conformance.json

HAProxy gets a minimal configuration (one frontend, one backend with the upstream,
its defaults otherwise: `http-reuse safe`, keep-alive, no health check). It adds no
X-Forwarded-* headers, so what a case expects of those (lbsession's own additions,
which no RFC asks for) is checked for lbsession only; so are a case's `limits`
(HAProxy keeps its 16 KiB buffer, under the 32 KiB head limit a case may set).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.conformance_table import ALL_CASES, Case, check_case, lbsession_answer, scripted
from tests.integration.proxy_fixtures import RawUpstream, free_port

START_TIMEOUT_S = 15.0
CASE_TIMEOUT_S = 20.0  # every read inside a case is bounded at 5 s already


@dataclass(frozen=True)
class Proxy:
    """A proxy to judge: how to start it in front of an upstream, and how to tell its own answers."""

    name: str
    start: Callable[[Case, str, Path], contextlib.AbstractAsyncContextManager[int]]  # yields its port
    own_answer: Callable[[bytes, int], bool]
    forwarded_headers: bool


@contextlib.asynccontextmanager
async def lbsession_lb(case: Case, upstream_url: str, work: Path) -> AsyncIterator[int]:
    """`python -m lbsession lb` on a free port, with the case's limits given as variables."""
    environ = {f"LBSESSION_BALANCER__LIMITS__{name.upper()}": str(value) for name, value in case.limits}
    words = ["lb", "--port", "0", "--admin-port", "0", f"--upstream=raw={upstream_url}", "--health-interval", "60"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbsession", "--log-level", "warning", *words,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        env={**_environ(), **environ},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            line = (await process.stdout.readline()).decode()
        match = re.search(r" on http://127\.0\.0\.1:(\d+) ", line)
        if match is None:
            raise RuntimeError(f"lbsession lb did not start: {line!r}")
        yield int(match.group(1))
    finally:
        await _stop(process)


def haproxy_config(port: int, upstream_url: str) -> str:
    """One frontend, one backend pointing at the scripted upstream; HAProxy's defaults for everything else."""
    server = upstream_url.removeprefix("http://")
    return (
        "global\n    nbthread 1\n\n"
        "defaults\n    mode http\n"
        "    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\n"
        f"frontend conformance\n    bind 127.0.0.1:{port}\n    default_backend scripted\n\n"
        f"backend scripted\n    server raw {server}\n"
    )


def haproxy_proxy(binary: str) -> Callable[[Case, str, Path], contextlib.AbstractAsyncContextManager[int]]:
    """Start `haproxy -db` for one case, on a free port; ready when the port accepts."""

    @contextlib.asynccontextmanager
    async def start(case: Case, upstream_url: str, work: Path) -> AsyncIterator[int]:
        port = free_port()
        config = work / "haproxy.cfg"
        config.write_text(haproxy_config(port, upstream_url))
        process = await asyncio.create_subprocess_exec(
            binary, "-f", str(config), "-db",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not await _accepts(port):
                    if process.returncode is not None:
                        raise RuntimeError(f"haproxy exited {process.returncode}; check {config}")
                    await asyncio.sleep(0.02)  # polling a port that is not bound yet: nothing to wait on
            yield port
        finally:
            await _stop(process)

    return start


def haproxy_answer(body: bytes, status: int) -> bool:
    """Whether `body` is one of HAProxy's own error pages (`<html><body><h1>400 Bad request</h1>`)."""
    return f"<h1>{status} ".encode() in body


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return True


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LBSESSION_")}


async def judge(proxy: Proxy, case: Case, work: Path) -> dict[str, Any]:
    """One cell of the table: the case through `proxy`, then its alternative (if any) when that failed."""
    result = await judge_once(proxy, case, work)
    if not result["ok"] and case.alternative is not None:
        other = await judge_once(proxy, case.alternative, work)
        if other["ok"]:
            return other | {"alternative": case.alternative.verdict, "instead_of": result["problem"]}
        result["problem"] += f"; as {case.alternative.verdict}: {other['problem']}"
    return result


async def judge_once(proxy: Proxy, case: Case, work: Path) -> dict[str, Any]:
    """The case through `proxy`, with a fresh upstream and a fresh proxy process."""
    upstream = RawUpstream(scripted(case))
    await upstream.start()
    statuses: list[int] = []
    try:
        async with proxy.start(case, upstream.url, work) as port:
            async with asyncio.timeout(CASE_TIMEOUT_S):
                await check_case(
                    case,
                    port,
                    upstream,
                    own_answer=proxy.own_answer,
                    forwarded_headers=proxy.forwarded_headers,
                    statuses=statuses,
                )
        return {"ok": True, "status": statuses[0] if statuses else None, "problem": None}
    except AssertionError as exc:
        problem = str(exc).splitlines()[0]
    except TimeoutError:
        problem = "no answer in time"
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        problem = f"the connection broke: {type(exc).__name__}"
    finally:
        await upstream.stop()
    return {"ok": False, "status": statuses[0] if statuses else None, "problem": problem}


def cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not run"
    status = f" {result['status']}" if result["status"] is not None else ""
    if result.get("alternative"):
        return f"ok{status}, the RFC's other answer ({result['alternative']})"
    return f"ok{status}" if result["ok"] else f"**NO**{status}: {result['problem']}"


def asked(case: Case) -> str:
    """The verdict the RFCs ask for, with the status the client must get (or the other one they allow)."""
    other = case.alternative
    return f"{case.verdict} ({case.status})" + (f" or {other.verdict} ({other.status})" if other else "")


async def run(proxies: list[Proxy]) -> dict[str, Any]:
    """Every case through every proxy; the rows of the table and each proxy's count."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="lbsession-conformance-") as tmp:
        for case in ALL_CASES:
            row: dict[str, Any] = {"case": case.id, "asked": asked(case)}
            for proxy in proxies:
                row[proxy.name] = await judge(proxy, case, Path(tmp))
            rows.append(row)
            print(f"  {case.id}: " + ", ".join(f"{p.name} {cell(row[p.name])}" for p in proxies), file=sys.stderr)
    counts = {p.name: sum(1 for r in rows if r[p.name]["ok"]) for p in proxies}
    return {"cases": len(rows), "conforming": counts, "rows": rows}


def markdown(report: dict[str, Any], names: list[str], versions: dict[str, str]) -> str:
    """The table, then one line per proxy with its count."""
    header = ["case", "RFC asks"] + [f"{n} ({versions[n]})" for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in report["rows"]:
        lines.append("| " + " | ".join([f"`{row['case']}`", row["asked"]] + [cell(row.get(n)) for n in names]) + " |")
    lines.append("")
    for name in names:
        lines.append(f"{name}: {report['conforming'][name]} of {report['cases']} cases as the RFCs ask")
    return "\n".join(lines)


def _version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return "?"
    match = re.search(r"(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--haproxy", default="auto", choices=["auto", "yes", "no"], help="also judge HAProxy")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    proxies = [Proxy("lbsession", lbsession_lb, lbsession_answer, forwarded_headers=True)]
    versions = {"lbsession": _version([sys.executable, "-m", "lbsession", "--version"])}
    binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin:/sbin")
    if args.haproxy == "yes" and binary is None:
        print("error: --haproxy yes: haproxy is not installed; install it or use --haproxy no", file=sys.stderr)
        return 2
    if binary is not None and args.haproxy != "no":
        proxies.append(Proxy("haproxy", haproxy_proxy(binary), haproxy_answer, forwarded_headers=False))
        versions["haproxy"] = _version([binary, "-v"])
    started = time.monotonic()
    report = asyncio.run(run(proxies))
    report["versions"] = versions
    print(markdown(report, [p.name for p in proxies], versions))
    print(f"\n{report['cases']} cases in {time.monotonic() - started:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
