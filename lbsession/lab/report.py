"""Results of scenario runs: verdicts against the stated expectations, tables, Markdown and JSON.

One run is a RunReport. `format_run` prints one in full; `format_matrix` prints
many as one table, one row per run, followed by each claim's verdict with the
measurements it rests on. The Markdown report is the same content as tables;
the JSON is `RunReport.as_dict()` (and, for the matrix, the document that
lbsession/lab/matrix.schema.json describes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lbsession.lab.measures import NAMED_USERS, AppliedFault
from lbsession.lab.scenario import Expectation, Scenario

PASS, FAIL, NO_CLAIM = "PASS", "FAIL", "-"
_LINK_LIST = re.compile(r"\[([^\]]*)\]")  # a partition's cut, as its description lists it


def _count_links(match: re.Match[str]) -> str:
    return f"({len(match.group(1).split(','))} links)"


@dataclass(frozen=True)
class Check:
    """One expectation, measured."""

    expectation: Expectation
    measured: float | int | None
    passed: bool
    not_applicable: str | None = None  # why the balancer in front cannot give the metric; the check then counts not

    def as_dict(self) -> dict[str, Any]:
        """The check for the JSON report."""
        e = self.expectation
        return {"expect": str(e), "metric": e.metric, "op": e.op, "value": e.value, "measured": self.measured,
                "passed": self.passed, "not_applicable": self.not_applicable}  # fmt: skip

    def describe(self) -> str:
        """`relogins > 0: 37`, as the tables show it."""
        if self.not_applicable:
            return f"{self.expectation}: not applicable ({self.not_applicable})"
        shown = _number(self.measured)
        if isinstance(self.measured, float) and self.expectation.check(float(shown)) != self.passed:
            shown = f"{self.measured:.3f}"  # 1.245 against "< 1.25" must not read as 1.25
        return f"{self.expectation}: {shown}"


@dataclass
class RunReport:
    """Everything one run of one scenario measured, and its verdict."""

    scenario: Scenario
    strategy: str
    backend: str
    target: str | None
    metrics: dict[str, float | int | None]
    per_server: dict[str, int]
    routes: dict[str, int]
    faults: list[AppliedFault]
    setup_s: float
    wall_s: float
    servers: int  # behind the balancer when the run started
    sample_cookie: str | None = None
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    verdict: str = NO_CLAIM
    balancer: str = "lbsession"  # the balancer in front (lbsession.lab.balancers)
    agrees: str | None = None  # in the matrix, a real balancer's run compared with lbsession's own
    # Who lost cart writes, who logged in again (lbsession.lab.measures.NAMED_USERS), each with a count.
    named_users: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def evaluate(self, expectations: Sequence[Expectation], unseen: Mapping[str, str] | None = None) -> None:
        """Measure each expectation; PASS only when all hold and every fault was applied.

        `unseen` maps the metrics the balancer in front cannot give to the reason: their
        checks are reported as not applicable and count neither way.
        """
        unseen = unseen or {}
        self.checks = [
            Check(e, None, True, unseen[e.metric])
            if e.metric in unseen
            else Check(e, self.metrics.get(e.metric), e.check(self.metrics.get(e.metric)))
            for e in expectations
        ]
        failed_faults = [f for f in self.faults if f.error is not None]
        self.notes += [f"fault {f.description} failed: {f.error}" for f in failed_faults]
        if not any(c.not_applicable is None for c in self.checks) and not failed_faults:
            self.verdict = NO_CLAIM
        else:
            self.verdict = PASS if all(c.passed for c in self.checks) and not failed_faults else FAIL

    @property
    def fault_text(self) -> str:
        """The faults in a few words (`-` when none); a partition's links counted, not listed (see format_run)."""
        return ", ".join(f"{_LINK_LIST.sub(_count_links, f.description)}@{f.at_s:g}s" for f in self.faults) or "-"

    def as_dict(self) -> dict[str, Any]:
        """The run as JSON (see matrix.schema.json, `run`)."""
        s = self.scenario
        return {
            "claim": s.claim,
            "scenario": s.name,
            "title": s.title,
            "source": s.source,
            "seed": s.seed,
            "target": self.target,
            "topology": {"strategy": self.strategy, "backend": self.backend, "servers": self.servers,
                         "balancer": self.balancer},
            "population": {"users": s.population.users, "addresses": s.population.addresses,
                           "nat_users": s.population.nat_users, "heavy_users": s.population.heavy_users},
            "duration_s": s.duration_s,
            "setup_s": round(self.setup_s, 3),
            "wall_s": round(self.wall_s, 3),
            "faults": [f.as_dict() for f in self.faults],
            "metrics": self.metrics,
            "per_server": self.per_server,
            "routes": self.routes,
            "sample_cookie": self.sample_cookie,
            "checks": [c.as_dict() for c in self.checks],
            "verdict": self.verdict,
            "agrees": self.agrees,
            "notes": self.notes,
            "named_users": {kind: self.named_users.get(kind, []) for kind in NAMED_USERS},
        }  # fmt: skip


# --------------------------------------------------------------------------- one run, in full


def format_run(report: RunReport) -> str:
    """One run as a block of text for the terminal."""
    s, m = report.scenario, report.metrics
    where = f"against {report.target}" if report.target else f"{report.servers} servers"
    lines = [
        f"{s.label}  {s.name}  [{report.verdict}]",
        f"  {s.title}" if s.title else "",
        f"  {report.strategy} + {report.backend} through {report.balancer}, {where}, seed {s.seed},"
        f" {s.duration_s:g} s of traffic",
        f"  users {m['users']}   requests {m['requests']}   re-logins {m['relogins']} ({m['relogin_users']} users)"
        f"   5xx {m['errors_5xx']}   no answer {m['errors_network']}",
        "  per server   " + "  ".join(f"{k} {v}" for k, v in report.per_server.items()),
        f"  balance      imbalance {_number(m['imbalance'])}   cv {_number(m['cv'])}"
        f"   hottest {_percent(m['hottest_share'])}   in flight max/mean p95 {_number(m['inflight_imbalance_p95'])}"
        f" max {_number(m['inflight_imbalance_max'])}",
        _bounds_line(m),
        f"  latency      p50 {_ms(m['p50_ms'])} ms   p99 {_ms(m['p99_ms'])} ms"
        f"   longest stall {_number(m['stall_s'])} s",
        "  routes       " + (", ".join(f"{k} {v}" for k, v in report.routes.items() if v) or "-"),
    ]
    if m["slowed_share"] is not None:
        pinned = "" if m["slowed_users"] is None else (
            f"   its {m['slowed_users']} pinned users p50 {_ms(m['slowed_users_p50_ms'])} ms,"
            f" the others {_ms(m['other_users_p50_ms'])} ms"
        )  # fmt: skip
        lines.append(f"  slowed       {_percent(m['slowed_share'])} of the answers{pinned}")
    lines += [f"  {heading:<12} {users}" for heading, users in named_lines(report.named_users)]
    for fault in report.faults:
        applied = "not applied" if fault.applied_s is None else f"applied at {fault.applied_s:.2f} s"
        outcome = f"FAILED: {fault.error}" if fault.error else f"took {fault.took_s:.2f} s"
        lines.append(f"  fault        {fault.description} at {fault.at_s:g} s ({applied}, {outcome})")
    if report.sample_cookie:
        how = "signed: the tag after the last dot" if report.balancer == "lbsession" else "in clear, unsigned"
        lines.append(f"  LB cookie    {report.sample_cookie}  (names the server; {how})")
    for index, check in enumerate(report.checks):
        head = "  expected     " if index == 0 else "               "
        outcome = "n/a" if check.not_applicable else PASS if check.passed else FAIL
        lines.append(f"{head}{check.describe():<48} {outcome}")
    lines += [f"  note         {note}" for note in report.notes]
    return "\n".join(line for line in lines if line)


def _bounds_line(m: dict[str, Any]) -> str:
    """Bounded loads as the balancer audited its decisions (empty when its strategy counts none)."""
    if m["decision_imbalance_max"] is None:
        return ""
    violations = "no bound" if m["bound_violations"] is None else f"over their bound {m['bound_violations']}"
    full = "" if m["bound_fallbacks"] is None else f"   every server full {m['bound_fallbacks']}"
    return f"  decisions    in flight before / mean, the worst {m['decision_imbalance_max']:.3f}   {violations}{full}"


NAMED_SHOWN = 10  # users named per list in the text reports; the rest are counted
NAMED_HEADINGS = {"lost_updates": "lost writes", "relogins": "re-logged in"}


def named_lines(named: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """(heading, `user-003 (2), user-007 (1) +4 more`) for each non-empty list of named users."""
    out = []
    for kind, heading in NAMED_HEADINGS.items():
        users = named.get(kind) or []
        if users:
            shown = ", ".join(f"{u['user']} ({u['count']})" for u in users[:NAMED_SHOWN])
            rest = len(users) - NAMED_SHOWN
            out.append((heading, shown + (f" +{rest} more" if rest > 0 else "")))
    return out


# --------------------------------------------------------------------------- many runs, one table

Column = tuple[str, Callable[[RunReport], str]]
FAULT_WIDTH = 48  # the table's fault column; each run's report lists its faults in full


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


COLUMNS: list[Column] = [
    ("claim", lambda r: r.scenario.label),
    ("scenario", lambda r: r.scenario.name),
    ("strategy", lambda r: r.strategy),
    ("balancer", lambda r: r.balancer),
    ("store", lambda r: r.backend + (" ha" if r.scenario.topology.redis_server.ha else "")),
    ("fault", lambda r: _clip(r.fault_text, FAULT_WIDTH)),
    ("users", lambda r: _number(r.metrics["users"])),
    ("req", lambda r: _number(r.metrics["requests"])),
    ("re-login (users)", lambda r: f"{_number(r.metrics['relogins'])} ({_number(r.metrics['relogin_users'])})"),
    ("5xx", lambda r: _number(r.metrics["errors_5xx"])),
    ("imbal", lambda r: _number(r.metrics["imbalance"])),
    ("cv", lambda r: _number(r.metrics["cv"])),
    ("inflt p95", lambda r: _number(r.metrics["inflight_imbalance_p95"])),
    ("p50ms", lambda r: _ms(r.metrics["p50_ms"])),
    ("p99ms", lambda r: _ms(r.metrics["p99_ms"])),
    ("stall s", lambda r: _number(r.metrics["stall_s"])),
    ("verdict", lambda r: r.verdict),
    ("agrees with lbsession", lambda r: r.agrees or "-"),
]


BALANCER_COLUMNS = ("balancer", "agrees with lbsession")


def columns(reports: Sequence[RunReport]) -> list[Column]:
    """The table's columns: the balancer's two only when a real balancer is among the runs."""
    real = any(r.balancer != "lbsession" for r in reports)
    return [c for c in COLUMNS if real or c[0] not in BALANCER_COLUMNS]


def format_matrix(reports: Sequence[RunReport]) -> str:
    """Many runs as one aligned table, then the verdict of every run that states expectations."""
    shown = columns(reports)
    rows = [[header for header, _ in shown]] + [[cell(r) for _, cell in shown] for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(shown))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "verdicts (expected: measured):"]
    for r in reports:
        if r.checks or r.notes:
            checks = "; ".join(c.describe() for c in r.checks)
            through = f" ({r.balancer})" if r.balancer != "lbsession" else ""
            lines.append(f"  {r.scenario.label:<4} {r.verdict:<5} {r.scenario.name}{through}: {checks}")
            lines += [f"             note: {note}" for note in r.notes]
    return "\n".join(lines)


def to_markdown(reports: Sequence[RunReport], title: str) -> str:
    """The runs as a Markdown document: the table, then each verdict with its measurements."""
    shown = columns(reports)
    lines = [f"# {title}", "", "| " + " | ".join(h for h, _ in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r).replace("|", "\\|") for _, cell in shown) + " |" for r in reports]
    real = len(shown) == len(COLUMNS)  # a real balancer among the runs: say which balancer each row is
    head = ["claim", "scenario", *(["balancer"] if real else []), "what it shows", "expected: measured", "verdict"]
    lines += ["", "## Verdicts", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        if r.checks:
            checks = "<br>".join(c.describe() for c in r.checks)
            cells = [r.scenario.label, r.scenario.name, *([r.balancer] if real else []), r.scenario.title, checks]
            lines.append("| " + " | ".join([*cells, r.verdict]) + " |")
    named = [
        f"- {r.scenario.name}{f' ({r.balancer})' if real else ''}: {heading}: {users}"
        for r in reports
        for heading, users in named_lines(r.named_users)
    ]
    lines += ["", "## Users who lost writes or logged in again", "", *named] if named else []
    notes = [f"- {r.scenario.name}{f' ({r.balancer})' if real else ''}: {note}" for r in reports for note in r.notes]
    return "\n".join(lines + (["", "## Notes", "", *notes] if notes else [])) + "\n"


def write_reports(out_dir: Path, stem: str, document: dict[str, Any], markdown: str) -> list[Path]:
    """Write `<stem>.json` and `<stem>.md` into `out_dir` (created if needed); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    """Where a run is: what the progress bar shows."""

    label: str
    elapsed_s: float
    duration_s: float
    requests: int
    relogins: int
    faults_applied: int


class ProgressBar:
    """A progress line redrawn in place on a terminal; silent when the stream is not one."""

    def __init__(self, stream: TextIO, width: int = 28) -> None:
        self.stream = stream
        self.width = width
        self.enabled = stream.isatty()

    def __call__(self, progress: Progress) -> None:
        """Redraw the line for `progress`."""
        if not self.enabled:
            return
        done = min(1.0, progress.elapsed_s / progress.duration_s) if progress.duration_s else 1.0
        bar = "#" * round(done * self.width)
        self.stream.write(
            f"\r{progress.label} [{bar:<{self.width}}] {progress.elapsed_s:4.1f}/{progress.duration_s:g} s"
            f"  {progress.requests} req  {progress.relogins} re-logins  {progress.faults_applied} faults\x1b[K"
        )
        self.stream.flush()

    def finish(self, line: str) -> None:
        """Replace the bar with a final line (printed whether or not the stream is a terminal)."""
        self.stream.write(("\r\x1b[K" if self.enabled else "") + line + "\n")
        self.stream.flush()


def _number(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _ms(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _percent(value: float | int | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"
