"""The `lbsession` command: the only place that prints for humans or exits.

    lbsession run      a whole lab: balancer + N app servers, until Ctrl-C
    lbsession lb       the balancer alone, in front of any HTTP/1.1 servers
    lbsession server   one app server (WAS)
    lbsession bench    measure the balancer's throughput, latency and CPU per request
    lbsession scenario run one lab scenario (configs/scenarios/) and report what it measured
    lbsession matrix   every strategy x every store, and every claim's scenario, in one table
    lbsession links    the lab's faultable TCP links (started by `run` and the scenarios, not by hand)

Exit status: 0 success, 2 a usage or configuration mistake (with a one-line
`error:` that says how to fix it), 1 a failure at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, get_args, get_origin

from lbsession import __version__
from lbsession.config import (
    STRATEGY_NAMES,
    BalancerConfig,
    Config,
    DeclaredSetting,
    declared_settings,
    load_config,
)
from lbsession.errors import ConfigError, LBSessionError, TopologyError
from lbsession.lab.balancers import BALANCER_NAMES

if TYPE_CHECKING:
    from lbsession.lab.bench import BenchReport

log = logging.getLogger("lbsession")


class UsageError(LBSessionError):
    """A mistake on the command line; exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake raised as one UsageError line rather than the whole usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (also used to check docker-compose commands)."""
    parser = _Parser(
        prog="lbsession",
        description="A hands-on lab of the session problem behind a load balancer.",
    )
    parser.add_argument("--version", action="version", version=f"lbsession {__version__}")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--loop", default="auto", choices=["auto", "asyncio", "uvloop"], help="event loop (auto: uvloop when installed)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="start a whole lab: the balancer and N app servers, until Ctrl-C")
    _config_flags(run, "run", "a YAML topology file (see configs/)")
    run.add_argument("--ready-file", type=Path, help="write the URLs and pids as JSON here once everything is healthy")
    run.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' log folder on exit, and print where it is"
    )
    _balancer_flag(run, BALANCER_NAMES)
    run.add_argument(
        "--print-config", action="store_true", help="print the config the lab writes for --balancer haproxy|nginx"
    )
    # Not offered (a lab waits on its checks), but refused by name rather than as an ambiguous --health-*.
    run.add_argument("--health", dest="refused_health", help=argparse.SUPPRESS)

    lb = sub.add_parser("lb", help="run the load balancer alone, in front of any HTTP/1.1 servers")
    _config_flags(lb, "lb", "a YAML topology file (see configs/)")
    # Not a declared setting: one flag per upstream builds a list of (id, url) records.
    lb.add_argument(
        "--upstream",
        action="append",
        metavar="[ID=]URL",
        help="an upstream server, e.g. was-1=http://127.0.0.1:8001 (repeatable; env LBSESSION_BALANCER__UPSTREAMS)",
    )

    server = sub.add_parser("server", help="run one app server (WAS)")
    _config_flags(server, "server", "a YAML file; its `app:` section is used")
    server.add_argument("--access-log", action="store_true", help="log every request (costs CPU)")
    server.add_argument("--ready-line", action="store_true", help="print one JSON line on stdout once listening")

    links = sub.add_parser("links", help="the lab's TCP relays with faults (a child of `lbsession run`)")
    links.add_argument("--port", type=int, default=0, help="the control API's loopback port (default: any free one)")
    links.add_argument("--ready-line", action="store_true", help="print one JSON line on stdout once listening")

    _bench_parser(sub)
    _lab_parsers(sub)
    return parser


def _bench_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    bench = sub.add_parser("bench", help="measure req/s, latency and the balancer's CPU per request")
    bench.add_argument(
        "--requests", type=int, default=20000, help="requests per measured target with --tool builtin (default 20000)"
    )
    bench.add_argument(
        "--duration", type=int, default=5, help="seconds of each measured wrk run, after a 1 s warm-up (default 5)"
    )
    bench.add_argument("--connections", type=int, default=50, help="concurrent keep-alive connections (default 50)")
    bench.add_argument("--servers", type=int, default=3, help="upstream servers (default 3)")
    bench.add_argument(
        "--strategy",
        default="round-robin",
        choices=[*STRATEGY_NAMES, "all"],
        help="balancer strategy, each beside its HAProxy equivalent; all: every one (default round-robin)",
    )
    bench.add_argument(
        "--tool", default="auto", choices=["auto", "wrk", "builtin"], help="load generator (auto: wrk when installed)"
    )
    bench.add_argument(
        "--haproxy", default="auto", choices=["auto", "yes", "no"], help="also measure HAProxy in the same setup"
    )
    bench.add_argument(
        "--body-bytes",
        type=int,
        metavar="N",
        help="each response's body size in bytes (nginx serves a file of N bytes; default: a 3-byte answer)",
    )
    bench.add_argument("--json", type=Path, help="also write the figures as JSON here")


def _lab_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    scenario = sub.add_parser("scenario", help="run one scenario and report re-logins, load, latency, verdict")
    scenario.add_argument("name", metavar="NAME|FILE", help="a claim id (C6), a scenario file's name, or a path")
    scenario.add_argument(
        "--target", metavar="ADMIN_URL", help="run against a running `lbsession run` (e.g. http://127.0.0.1:8081)"
    )
    scenario.add_argument(
        "--lb", metavar="URL", help="with --target: the balancer's public URL, if not the one it reports (containers)"
    )
    _balancer_flag(scenario, BALANCER_NAMES)
    matrix = sub.add_parser("matrix", help="every strategy x store, then every claim's scenario, in one table")
    _balancer_flag(matrix, (*BALANCER_NAMES, "all"))
    matrix.add_argument(
        "--only", action="append", metavar="CLAIM|FAMILY|NAME", help="run only these: C6, a family (F), a name"
    )
    matrix.add_argument("--scenarios", type=Path, help="the scenario directory (default: the shipped scenarios)")
    for parser in (scenario, matrix):
        parser.add_argument("--seed", type=int, help="the seed of the population and its order (default: the file's)")
        parser.add_argument("--users", type=int, help="how many virtual users (default: the file's)")
        parser.add_argument("--duration", type=float, help="seconds of traffic; the faults' times scale along")
        parser.add_argument("--out", type=Path, metavar="DIR", help="also write the results as JSON and Markdown here")


def _balancer_flag(parser: argparse.ArgumentParser, choices: Sequence[str]) -> None:
    all_help = "; all: every one installed" if "all" in choices else ""
    parser.add_argument(
        "--balancer",
        default="lbsession",
        choices=choices,
        help=f"the balancer in front: lbsession's own, or a real one the lab starts{all_help} (default: lbsession)",
    )


def _require_balancers(names: Sequence[str]) -> None:
    """ConfigError (exit 2) naming the apt package of a real balancer that is not installed."""
    from lbsession.lab.balancers import REAL_BALANCERS, require_binary

    for name in names:
        if name in REAL_BALANCERS:
            require_binary(name)


def _config_flags(parser: argparse.ArgumentParser, command: str, config_help: str) -> None:
    """`--config` and a flag for every setting declared for `command` (lbsession.config.setting)."""
    parser.add_argument("--config", type=Path, help=config_help)
    for declared in declared_settings():
        flag = declared.flag
        if command not in flag.commands:
            continue
        kind: dict[str, Any] = {"metavar": flag.metavar or flag.name.rsplit("-", 1)[-1].upper()}
        if declared.hint is bool and not flag.switch:
            kind = {"action": "store_true", "default": None}  # None: unset, so the file and variables count
        elif flag.repeat:
            kind["action"] = "append"
        # No argparse `type` or `choices`: the config loader checks every value, so a mistake reads
        # the same from a flag, a file or a variable, and names the flag the user typed.
        parser.add_argument(flag.name, dest=_dest(declared.path), help=_flag_help(declared), **kind)


def _dest(key_path: str) -> str:
    return "setting." + key_path


def _flag_help(declared: DeclaredSetting) -> str:
    flag = declared.flag
    choices = (
        flag.choices() if flag.choices else get_args(declared.hint) if get_origin(declared.hint) is Literal else ()
    )
    text = flag.help + (f"; one of: {', '.join(choices)}" if choices else "")
    default = flag.default_text
    if default is None:
        value = declared.default
        default = (
            ("off" if not value else "on")
            if isinstance(value, bool)
            else f"{value:g}"
            if isinstance(value, float)
            else str(value)
        )
    return f"{text} (default: {default}; env {declared.env})".replace("%", "%%")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Load the config file named by --config, then `LBSESSION_*` variables, then the flags given."""
    overrides: dict[str, Any] = {}
    for declared in declared_settings():
        if args.command in declared.flag.commands:
            value = getattr(args, _dest(declared.path), None)
            if declared.flag.switch:
                value = _switch(declared.flag.name, value)
            overrides[f"{declared.path}|{declared.flag.name}"] = _split(value) if declared.flag.split else value
    if getattr(args, "upstream", None):
        overrides["balancer.upstreams|--upstream"] = [_parse_upstream(i, u) for i, u in enumerate(args.upstream, 1)]
    return load_config(getattr(args, "config", None), overrides, environ)


def _switch(flag: str, text: str | None) -> bool | None:
    if text is None:
        return None
    if text.lower() in ("on", "off"):
        return text.lower() == "on"
    raise UsageError(f"{flag}: {text!r} is not on or off; give {flag} on or {flag} off")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _parse_upstream(index: int, text: str) -> dict[str, str]:
    server_id, sep, url = text.partition("=")
    return {"id": server_id, "url": url} if sep and "://" not in server_id else {"id": f"s{index}", "url": text}


# --------------------------------------------------------------------------- commands


def _stop_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM; installed before anyone is told we are up, so none is missed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def cmd_run(args: argparse.Namespace) -> int:
    """`lbsession run`: the whole lab until Ctrl-C; its log folder is removed on exit unless --keep-logs."""
    if args.refused_health is not None:
        raise UsageError(
            "--health: `lbsession run` keeps its active health checks (it waits on them to know its servers "
            "are up); --health off is for `lbsession lb`"
        )
    config = config_from_args(args)
    if args.print_config:
        from lbsession.lab.balancers import printed_config

        if args.balancer == "lbsession":
            raise UsageError("--print-config prints a real balancer's config; add --balancer haproxy or nginx")
        print(printed_config(args.balancer, config), end="")
        return 0
    _require_balancers([args.balancer])
    _check_ports_free(config.balancer)
    log_dir = Path(tempfile.mkdtemp(prefix="lbsession-"))
    try:
        return await _run_lab(args, config, log_dir)
    except TopologyError as exc:
        if args.keep_logs:
            raise
        raise TopologyError(f"{exc} (the logs are removed on exit; run again with --keep-logs to read them)") from None
    finally:
        if args.keep_logs:
            print(f"logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


async def _run_lab(args: argparse.Namespace, config: Config, log_dir: Path) -> int:
    from lbsession.lab.topology import Topology, write_ready_file

    topology = Topology(config, log_dir=log_dir, balancer=args.balancer)
    stop = _stop_signals()
    await topology.start()
    try:
        info = topology.ready_info()
        _print_lab(info, config, keep_logs=args.keep_logs)
        if args.ready_file:
            write_ready_file(args.ready_file, info)
        await stop.wait()
        print("\nstopping the lab...", file=sys.stderr)
    finally:
        await topology.stop()
    return 0


def _check_ports_free(balancer: BalancerConfig) -> None:
    """UsageError naming the flag when a listener's port is taken, before any process is started."""
    from lbsession.lab.process import port_in_use

    for flag, key, host, port in (
        ("--port", "balancer.port", balancer.host, balancer.port),
        ("--admin-port", "balancer.admin_port", balancer.admin_host, balancer.admin_port),
    ):
        if port_in_use(host, port):
            raise UsageError(
                f"{flag}: {key}: port {port} is already in use on {host}; choose a free one, or 0 for any free port"
            )


def _print_lab(info: dict[str, Any], config: Config, *, keep_logs: bool) -> None:
    lb, balancer = info["lb"], info.get("balancer", "lbsession")
    print(f"lbsession lab: strategy {info['strategy']}, backend {info['backend']}, {len(info['servers'])} app servers")
    if balancer == "lbsession":
        print(f"  load balancer   {lb}")
        print(f"  dashboard       {info['admin']}/")
        print(f"  admin status    {info['admin']}/status")
        print(f"  metrics         {info['admin']}/metrics (Prometheus)")
    else:  # a real balancer: its own process and config; the lab's admin port reports what it can see
        print(f"  load balancer   {lb}  ({balancer}, its config in the log folder)")
        print(f"  admin status    {info['admin']}/status  (what {balancer} shows, and what it cannot: 'unseen')")
    for server in info["servers"]:
        print(f"  {server['id']:<15} {server['url']}  (pid {server['pid']})")
    redis = info.get("redis")
    for node in (redis or {}).get("nodes", []) + (redis or {}).get("sentinels", []):
        print(f"  {node['name']:<15} redis://127.0.0.1:{node['port']}  (pid {node['pid']})")
    print(f"  logs            {info['log_dir']}" + ("" if keep_logs else "  (removed on exit; --keep-logs keeps them)"))
    print()
    print("Log in through the balancer, then ask who you are a few times:")
    print(
        f"  curl -s -c jar -b jar -H 'Content-Type: application/json' -d '{{\"username\": \"alice\"}}' {lb}/login; echo"
    )
    print(f"  for i in 1 2 3 4 5 6; do curl -s -c jar -b jar {lb}/me; echo; done")
    if info["strategy"] == "round-robin" and info["backend"] == "local":
        print("With round-robin and local sessions, some answers are 401 'login required': the bug.")
        print("Try again with --strategy sticky-cookie: every answer comes from the server you logged in on.")
    print("Press Ctrl-C to stop.", flush=True)


async def cmd_lb(args: argparse.Namespace) -> int:
    """`lbsession lb`: the balancer alone."""
    from lbsession.balancer.balancer import LoadBalancer
    from lbsession.dashboard.routes import add_dashboard_routes

    config = config_from_args(args).balancer
    if not config.upstreams:
        raise UsageError("no upstreams: give --upstream http://127.0.0.1:8001 (repeatable) or `upstreams:` in --config")
    _check_ports_free(config)
    lb = LoadBalancer(config)
    lb.admin_extensions.append(lambda app: add_dashboard_routes(app, lb))
    await lb.start()
    try:
        # Before the ready line: whoever reads it may signal at once, and SIGHUP's default is to terminate.
        stop = _stop_signals()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload, args, lb)
        print(
            f"balancing {len(config.upstreams)} upstreams on {lb.url} ({lb.strategy.name}); admin on {lb.admin_url}",
            flush=True,
        )
        await stop.wait()
    finally:
        await lb.stop()
    return 0


def _reload(args: argparse.Namespace, lb: Any) -> None:
    """SIGHUP: read the config again; a mistake leaves the running config as it is, and says why."""
    try:
        config = config_from_args(args).balancer
        if not config.upstreams:
            raise ConfigError("no upstreams in the new configuration")
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, the running configuration stays: %s", problem)
        return
    for change in lb.reload(config):
        log.warning("reload: %s changed, which takes a restart; the running value stays", change)
    log.info("reloaded: %d upstreams, strategy %s", len(config.upstreams), lb.strategy.name)


async def cmd_server(args: argparse.Namespace) -> int:
    """`lbsession server`: one app server."""
    from lbsession.appserver.app import AppServer, serve_forever

    config = config_from_args(args).app

    def ready(server: AppServer) -> None:
        if args.ready_line:
            line = {"ready": True, "id": config.id, "port": server.port, "url": server.url, "pid": os.getpid()}
            line.update(server.store.describe())  # a cluster node adds its replication address
            print(json.dumps(line), flush=True)
        else:
            print(f"{config.id} serving on {server.url} (sessions: {config.backend})", file=sys.stderr, flush=True)

    await serve_forever(config, ready, access_log=args.access_log)
    return 0


async def cmd_links(args: argparse.Namespace) -> int:
    """`lbsession links`: the relays of a lab, until SIGTERM."""
    from lbsession.lab.link_service import serve_links

    def ready(port: int) -> None:
        if args.ready_line:
            print(json.dumps({"ready": True, "port": port, "pid": os.getpid()}), flush=True)
        else:
            print(f"links control API on http://127.0.0.1:{port}", file=sys.stderr, flush=True)

    stop = _stop_signals()
    serving = asyncio.create_task(serve_links(ready, args.port))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    stopping.cancel()
    return 0


async def cmd_bench(args: argparse.Namespace) -> int:
    """`lbsession bench`: throughput, latency and CPU per request."""
    from lbsession.lab.bench import BenchParams, run_bench

    params = BenchParams(
        requests=args.requests,
        duration_s=args.duration,
        connections=args.connections,
        servers=args.servers,
        strategy=args.strategy,
        tool=args.tool,
        haproxy=args.haproxy,
        loop=args.loop,
        body_bytes=args.body_bytes,
    )
    report = await run_bench(params)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    for line in _bench_lines(report, args.json):
        print(line)
    return 0


_BENCH_ROW = "{:<32}{:>10}{:>9}{:>9}{:>12}{:>17}{:>8}"
_CASE_ROW = "{:<24}{:>11}{:>11}{:>8}{:>11}{:>11}{:>8}  {}"


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _bench_lines(report: BenchReport, json_path: Path | None) -> list[str]:
    """The bench's report as a table of targets, then one row per case with its ratios against HAProxy."""
    from lbsession.lab.bench import CPU_RATIO_TARGET, P99_RATIO_TARGET

    lines = [
        f"lbsession bench: {report.servers} {report.upstream} upstreams, {report.tool}, "
        f"balancer loop {report.loop}, strategy {report.strategy}",
        f"lbsession build: {report.build}",
        _BENCH_ROW.format("target", "req/s", "p50 ms", "p99 ms", "CPU us/req", "upstream us/req", "errors"),
    ]
    for row in report.figures:
        figures = [f"{row.load.rps:.0f}", f"{row.load.p50_ms:.2f}", f"{row.load.p99_ms:.2f}"]
        figures += [f"{row.cpu_us_per_request:.1f}", f"{row.upstream_cpu_us_per_request:.1f}"]
        lines.append(_BENCH_ROW.format(row.target, *figures, row.load.errors))
    lines += [
        "",
        f"lbsession / haproxy, each case beside its HAProxy equivalent "
        f"(targets: CPU <= {CPU_RATIO_TARGET}x, p99 <= {P99_RATIO_TARGET}x):",
        _CASE_ROW.format("case", "CPU lbs", "CPU hap", "ratio", "p99 lbs", "p99 hap", "ratio", "verdict"),
    ]
    for case in report.cases:
        ours = case.lbsession
        if case.haproxy is None:
            lines.append(f"{case.case:<24}{ours.cpu_us_per_request:>11.1f}  ({case.haproxy_config})")
            continue
        checks = (("CPU", case.cpu_target_met), ("p99", case.p99_target_met))
        missed = [name for name, met in checks if met is False]
        unknown = [name for name, met in checks if met is None]
        verdict = f"not met ({', '.join(missed)})" if missed else "met" if not unknown else "too few requests to tell"
        lines.append(
            _CASE_ROW.format(
                case.case,
                f"{ours.cpu_us_per_request:.1f}",
                f"{case.haproxy.cpu_us_per_request:.1f}",
                _times(case.cpu_ratio),
                f"{ours.load.p99_ms:.2f}",
                f"{case.haproxy.load.p99_ms:.2f}",
                _times(case.p99_ratio),
                verdict,
            )
        )
    if json_path is not None:
        lines.append(f"figures written to {json_path}")
    return lines


async def cmd_scenario(args: argparse.Namespace) -> int:
    """`lbsession scenario`: one scenario; exit status 1 when it measured something else than it expected."""
    from lbsession.config import parse_http_url
    from lbsession.lab.report import FAIL, ProgressBar, format_run, to_markdown, write_reports
    from lbsession.lab.runner import run_scenario
    from lbsession.lab.scenario import find_scenario, load_scenario

    if args.lb is not None and args.target is None:
        raise UsageError("--lb goes with --target: it names the public URL of the running lab's balancer")
    if args.balancer != "lbsession" and args.target is not None:
        raise UsageError("--balancer starts a lab of its own; with --target, the running lab's balancer is used")
    _require_balancers([args.balancer])
    for flag, url in (("--target", args.target), ("--lb", args.lb)):
        if url is not None:
            try:
                parse_http_url(url)
            except ValueError as exc:
                raise UsageError(f"{flag}: {exc}") from None
    scenario = load_scenario(find_scenario(args.name))
    scenario = scenario.with_overrides(seed=args.seed, users=args.users, duration_s=args.duration)
    if args.target is not None:
        await _check_target(args.target)
    progress = ProgressBar(sys.stderr)
    report = await run_scenario(
        scenario, target=args.target, lb_url=args.lb, on_progress=progress, balancer=args.balancer
    )
    progress.finish(f"{scenario.label} {scenario.name}: {report.verdict} ({report.setup_s + report.wall_s:.1f} s)")
    print(format_run(report))
    if args.out:
        title = f"{scenario.label} {scenario.name}"
        for path in write_reports(args.out, scenario.name, report.as_dict(), to_markdown([report], title)):
            print(f"wrote {path}")
    return 1 if report.verdict == FAIL else 0


async def _check_target(admin_url: str) -> None:
    """UsageError when nothing answers at --target: a wrong URL is a mistake, not a FAIL verdict."""
    from lbsession.lab.faults import AdminClient

    admin = AdminClient(admin_url)
    try:
        await admin.status()
    except TopologyError as exc:
        raise UsageError(f"--target {admin_url}: {exc}; start `lbsession run` first, or fix the URL") from None
    finally:
        await admin.close()


async def cmd_matrix(args: argparse.Namespace) -> int:
    """`lbsession matrix`: the whole table; exit status 1 unless every verdict is PASS."""
    from lbsession.lab.balancers import installed_balancers
    from lbsession.lab.matrix import load_directory, matrix_document, matrix_plan, run_matrix
    from lbsession.lab.report import PASS, ProgressBar, format_matrix, to_markdown, write_reports

    balancers = installed_balancers() if args.balancer == "all" else [args.balancer]
    _require_balancers(balancers)
    overrides = {"seed": args.seed, "users": args.users, "duration_s": args.duration}
    plan = [s.with_overrides(**overrides) for s in matrix_plan(load_directory(args.scenarios), args.only or ())]
    reports, wall_s = await run_matrix(plan, progress=ProgressBar(sys.stderr), balancers=balancers)
    print(format_matrix(reports))
    print(f"\n{len(reports)} runs in {wall_s:.1f} s")
    document = matrix_document(reports, wall_s, overrides)
    if args.out:
        for path in write_reports(args.out, "matrix", document, to_markdown(reports, "lbsession matrix")):
            print(f"wrote {path}")
    return 0 if document["verdict"] == PASS else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "run": cmd_run,
    "lb": cmd_lb,
    "server": cmd_server,
    "bench": cmd_bench,
    "scenario": cmd_scenario,
    "matrix": cmd_matrix,
    "links": cmd_links,
}


# --------------------------------------------------------------------------- entry point


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError(
                "--loop uvloop: uvloop is not installed; pip install uvloop, or use --loop asyncio"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _raise_file_limit() -> None:
    """Raise the open-files soft limit to the hard one, as HAProxy does: each client is a descriptor."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lbsession` command; return its exit status."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command in ("lb", "run"):
        _raise_file_limit()
    # A scenario's progress bar and tables would drown in the lab's info lines.
    default_level = "warning" if args.command in ("server", "scenario", "matrix", "links") else "info"
    logging.basicConfig(
        level=(args.log_level or default_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            return runner.run(COMMANDS[args.command](args))
    except (ConfigError, UsageError) as exc:
        for problem in getattr(exc, "problems", [str(exc)]):
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            hint = "choose free ones with --port/--admin-port, or 0 for any"
            print(f"error: a port is already in use ({exc.strerror}); {hint}", file=sys.stderr)
            return 2
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except LBSessionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
