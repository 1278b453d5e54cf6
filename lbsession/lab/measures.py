"""The measurements of one run, computed from what the users saw and what the lab reported.

Every metric a scenario may state an expectation about is listed in METRICS
with its meaning; `compute_metrics` returns all of them (None where a metric
does not apply, such as the victims of a fault in a run without one).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lbsession.lab.users import Record

METRICS: dict[str, str] = {
    "users": "virtual users",
    "requests": "requests sent, logins included",
    "logins": "successful logins, first ones included",
    "relogins": "401 'login required' after a successful login",
    "relogin_users": "users who had to log in again at least once",
    "relogin_user_share": "relogin_users / users",
    "errors_5xx": "responses with a 5xx status",
    "errors_network": "requests without a response (refused, reset, timed out)",
    "imbalance": "requests per server: the busiest server's over the mean (1 = even)",
    "cv": "requests per server: coefficient of variation (stdev / mean; 0 = even)",
    "hottest_share": "the busiest server's share of all requests",
    "inflight_imbalance_max": "in flight, sampled through the run: the busiest server's over the mean, the worst",
    "inflight_imbalance_p95": "in flight, sampled through the run: the busiest server's over the mean, p95",
    "bound_violations": "routing decisions that left their server above ceil(factor x mean in flight) (bounded loads)",
    "bound_fallbacks": "routing decisions that found every server at its bound (HAProxy then takes one anyway)",
    "decision_imbalance_max": "routing decisions: the chosen server's load before it over the mean with it, the worst",
    "rehashed_share": "requests the balancer sent past their key's server because it was full (bounded loads)",
    "spread_users": "users answered by more than one server during the run (moved off their server)",
    "p50_ms": "median latency",
    "p99_ms": "99th percentile latency",
    "stall_s": "longest time a user waited for a good answer (a slow request, or failures until one)",
    "relogins_before_fault": "re-logins answered before the first fault was applied",
    "relogins_after_fault": "re-logins answered once the first fault was applied (its effect)",
    "victim_users": "users whose last good answer before the first fault came from the fault's server",
    "victim_relogin_share": "share of victim_users who had to log in again after the fault",
    "bystander_relogins": "re-logins after the first fault by users who were not victims",
    "requests_on_added": "requests answered by servers that faults added",
    "relogins_on_added": "re-logins answered by servers that faults added",
    "added_share_final": "share of the last second's answers that came from servers that faults added",
    "returned_share_final": "share of the last second's answers that came from servers that faults restarted",
    "relogins_after_last_fault": "re-logins answered once the last fault was applied (a server's return, say)",
    "moved_share": "share of users answered by another server at the end than just before the first fault",
    "reconfigured_servers": "servers running before the run whose process changed (killed, restarted) by its end",
    "tampered": "sticky cookies the users forged",
    "forged_cookies": "forged cookies the balancer detected and ignored (its forged-cookie route counter)",
    "tamper_detected_share": "forged_cookies / tampered",
    "cookie_names_server": "share of answers whose sticky cookie named the server that answered",
    "cart_writes": "cart writes the servers acknowledged (in sessions still alive at the end)",
    "lost_updates": "acknowledged cart writes missing from the cart at the end (concurrent writes)",
    "ws_messages": "WebSocket messages answered (steps.websocket)",
    "ws_reconnects": "WebSockets opened again after one was lost (its server died)",
    "prefs_writes": "preference changes the servers acknowledged (in sessions still alive at the end)",
    "lost_prefs": "acknowledged preference changes missing at the end (a whole-session write overwrote them)",
    "too_large": "answers 413: a session refused as too large for its cookie",
    "session_cookie_bytes_max": "the largest session cookie a request carried (name=value)",
    "session_bytes_per_request": "session cookie bytes each request uploaded, on average",
    "replay_users": "users who copied their session cookie, logged out, and replayed the copy",
    "replays_accepted": "replays of a logged-out session's cookie answered as that user (logout is not revocation)",
    "replays_refused": "replays of a logged-out session's cookie answered 401",
    "replay_window_s": "the longest a copied cookie was still accepted after its user logged out",
    "session_forgeries": "requests sent with a damaged session cookie (tampered, truncated, another key's)",
    "forged_anonymous": "of them, answered 401: a fresh anonymous session",
    "forged_accepted": "of them, answered 200 as someone: must never happen",
    "forged_errors": "of them, answered with a 5xx or not at all",
    "forged_sessions": "damaged session cookies the app servers' store counted as forged (its own counter)",
    "slowed_share": "share of the answers that came from servers whose balancer link a fault changed (set-link lb->X)",
    "slowed_users": "users whose sticky cookie named such a slowed server at the end: pinned to it",
    "slowed_users_p50_ms": "median latency of the requests of slowed_users",
    "other_users_p50_ms": "median latency of the requests of the users pinned elsewhere",
}
NAMED_USERS = {
    "lost_updates": "users missing acknowledged cart writes at the end, with how many",
    "relogins": "users asked to log in again, with how many times",
}


@dataclass
class UserOutcome:
    """What one user counted for itself during a run."""

    index: int
    name: str = ""  # as the user logs in: user-003
    relogins: int = 0
    tampered: int = 0
    cookie_checks: int = 0
    cookie_matches: int = 0
    cart_acked: int = 0
    cart_seen: int | None = None
    prefs_acked: int = 0
    prefs_seen: int | None = None
    replayed: bool = False
    replays_accepted: int = 0
    replays_refused: int = 0
    replay_window_s: float = 0.0
    forged_answers: dict[int, int] = field(default_factory=dict)
    ws_reconnects: int = 0
    pinned_server: str | None = None  # the server its sticky cookie named at the end (None: no such cookie)


@dataclass
class AppliedFault:
    """A fault of the timeline as it was applied."""

    at_s: float  # planned
    action: str
    server: str | None
    description: str
    applied_s: float | None = None  # when the admin API was called, on the run's clock
    took_s: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    link: str | None = None  # set-link/heal-link: the link's name

    def as_dict(self) -> dict[str, Any]:
        """The fault for the JSON report."""
        return {
            "at_s": self.at_s,
            "action": self.action,
            "server": self.server,
            "description": self.description,
            "applied_s": None if self.applied_s is None else round(self.applied_s, 3),
            "took_s": round(self.took_s, 3),
            "result": self.result,
            "error": self.error,
            "link": self.link,
        }


@dataclass
class RunData:
    """Everything a run collected, as `compute_metrics` needs it."""

    records: list[Record]
    users: list[UserOutcome]
    faults: list[AppliedFault]
    servers: list[str]  # the balancer's servers when the run started
    routes: dict[str, int]  # the balancer's routing decisions during the run, by reason
    topology_before: dict[str, Any] | None  # GET /topology (None: the target is a bare balancer)
    topology_after: dict[str, Any] | None
    # The balancer's in-flight requests per healthy server, sampled through the run (GET /status).
    in_flight: list[dict[str, int]] = field(default_factory=list)
    # What the app servers' stores counted themselves (summed over the servers' /healthz), None: unknown.
    store_counts: dict[str, int] | None = None
    # What the balancer's strategy counted of its decisions during the run (GET /status), None: nothing.
    strategy_counters: dict[str, Any] | None = None


def compute_metrics(data: RunData) -> dict[str, float | int | None]:
    """Every metric of METRICS for one run."""
    records = data.records
    metrics: dict[str, float | int | None] = {
        "users": len(data.users),
        "requests": len(records),
        "logins": sum(1 for r in records if r.action == "login" and r.status == 200),
        "relogins": sum(1 for r in records if r.relogin),
        "relogin_users": sum(1 for u in data.users if u.relogins),
        "errors_5xx": sum(1 for r in records if r.status >= 500),
        "errors_network": sum(1 for r in records if r.status == 0),
        "stall_s": longest_stall(records),
        **latency(records),
        **balance(per_server(records, data.servers)),
        **in_flight_balance(data.in_flight),
        **decision_bounds(data.strategy_counters),
        "rehashed_share": _share(data.routes.get("rehashed", 0), sum(data.routes.values())),
        "spread_users": spread_users(records),
        **fault_effects(records, data),
        **cookie_effects(data),
        **cart_effects(data.users),
        **session_cookie_effects(records, data),
        **slow_server_effects(records, data),
        "ws_messages": sum(1 for r in records if r.action == "ws" and r.status == 200),
        "ws_reconnects": sum(u.ws_reconnects for u in data.users),
    }
    metrics["relogin_user_share"] = _share(metrics["relogin_users"], len(data.users))
    metrics["reconfigured_servers"] = reconfigured(data.topology_before, data.topology_after)
    return {name: metrics[name] for name in METRICS}  # in the documented order


def per_server(records: Iterable[Record], servers: Iterable[str]) -> dict[str, int]:
    """Requests answered by each server, every known server listed (an idle one is part of the imbalance)."""
    counts = Counter(r.server for r in records if r.server is not None)
    return {server: counts.get(server, 0) for server in [*servers, *sorted(set(counts) - set(servers))]}


def balance(counts: dict[str, int]) -> dict[str, float | None]:
    """Imbalance (max / mean), coefficient of variation and the hottest server's share."""
    values = list(counts.values())
    total = sum(values)
    if not values or total == 0:
        return {"imbalance": None, "cv": None, "hottest_share": None}
    mean = total / len(values)
    return {
        "imbalance": round(max(values) / mean, 3),
        "cv": round(statistics.pstdev(values) / mean, 3),
        "hottest_share": round(max(values) / total, 3),
    }


def in_flight_balance(samples: list[dict[str, int]]) -> dict[str, float | None]:
    """The busiest server's in-flight requests over the mean, per sample: the worst, and the 95th percentile.

    This is the load that bounded-load hashing caps (HAProxy counts it so), which requests per
    server over a whole run (`imbalance`) cannot show. Only samples with at least one request in
    flight per server count: below that, one request on an idle lab reads as an imbalance of N.
    """
    ratios = sorted(
        max(sample.values()) * len(sample) / sum(sample.values())
        for sample in samples
        if sample and sum(sample.values()) >= len(sample)
    )
    if not ratios:
        return {"inflight_imbalance_max": None, "inflight_imbalance_p95": None}
    p95 = ratios[max(0, math.ceil(0.95 * len(ratios)) - 1)]
    return {"inflight_imbalance_max": round(ratios[-1], 3), "inflight_imbalance_p95": round(p95, 3)}


def decision_bounds(counters: dict[str, Any] | None) -> dict[str, float | int | None]:
    """Bounded loads judged where they act, at each routing decision, by the balancer's own audit.

    `decision_imbalance_max` compares the chosen server's in-flight requests, before it takes
    the request, with the mean including it: HAProxy's test (`served < slots`). It is rounded
    down, not to the nearest: a ratio just under the factor must not read as the factor itself.
    """
    counters = counters or {}
    worst = counters.get("decision_imbalance_max")
    return {
        "bound_violations": counters.get("bound_violations"),
        "bound_fallbacks": counters.get("bound_fallbacks"),
        "decision_imbalance_max": None if worst is None else math.floor(worst * 1000 + 1e-9) / 1000,
    }


def spread_users(records: list[Record]) -> int:
    """Users whose answers came from more than one server."""
    servers: dict[int, set[str]] = {}
    for r in records:
        if r.server is not None and r.status < 500:
            servers.setdefault(r.user, set()).add(r.server)
    return sum(1 for seen in servers.values() if len(seen) > 1)


def latency(records: list[Record]) -> dict[str, float | None]:
    """p50 and p99 latency in milliseconds (nearest rank) of the requests that were answered."""
    answered = sorted(r.latency_s for r in records if r.status)
    if not answered:
        return {"p50_ms": None, "p99_ms": None}

    def rank(q: float) -> float:
        return round(answered[max(0, math.ceil(q * len(answered)) - 1)] * 1000, 1)

    return {"p50_ms": rank(0.50), "p99_ms": rank(0.99)}


def longest_stall(records: list[Record]) -> float | None:
    """The longest wait for a good answer, per user: from the first failing request to the next good one."""
    by_user: dict[int, list[Record]] = {}
    for record in sorted(records, key=lambda r: r.started_s):
        by_user.setdefault(record.user, []).append(record)
    longest = 0.0
    for mine in by_user.values():
        failing_since: float | None = None
        for record in mine:
            if record.ok:
                start = record.started_s if failing_since is None else failing_since
                longest = max(longest, record.ended_s - start)
                failing_since = None
            elif failing_since is None:
                failing_since = record.started_s
    return round(longest, 3) if records else None


def fault_effects(records: list[Record], data: RunData) -> dict[str, float | int | None]:
    """Re-logins around the first fault, its victims, the added servers, and who moved."""
    applied = [f for f in data.faults if f.applied_s is not None]
    added = {str(f.result.get("id")) for f in applied if f.action == "add-server" and f.result.get("id")}
    returned = {f.server for f in applied if f.action == "restart-server" and f.server}
    end_s = max((r.ended_s for r in records), default=0.0)
    final = [r for r in records if r.server is not None and r.ended_s >= end_s - 1.0]
    out: dict[str, float | int | None] = {
        "requests_on_added": sum(1 for r in records if r.server in added) if added else None,
        "relogins_on_added": sum(1 for r in records if r.relogin and r.server in added) if added else None,
        "added_share_final": _share(sum(1 for r in final if r.server in added), len(final)) if added else None,
        "returned_share_final": _share(sum(1 for r in final if r.server in returned), len(final)) if returned else None,
        "relogins_after_last_fault": None,
    }
    keys = ("relogins_before_fault", "relogins_after_fault", "victim_users", "victim_relogin_share")
    out.update(dict.fromkeys((*keys, "bystander_relogins", "moved_share")))
    if not applied:
        return out
    first = applied[0]
    at = first.applied_s or 0.0
    # By the answer's time: a request sent just before the fault can still be answered by its effect.
    out["relogins_before_fault"] = sum(1 for r in records if r.relogin and r.ended_s < at)
    out["relogins_after_fault"] = sum(1 for r in records if r.relogin and r.ended_s >= at)
    out["moved_share"] = moved_share(records, at)
    last_at = applied[-1].applied_s or 0.0
    out["relogins_after_last_fault"] = sum(1 for r in records if r.relogin and r.ended_s >= last_at)
    if first.server is not None:
        victims = {u for u, server in last_good_server(records, at).items() if server == first.server}
        after = [r for r in records if r.relogin and r.ended_s >= at]
        out["victim_users"] = len(victims)
        out["victim_relogin_share"] = _share(len({r.user for r in after if r.user in victims}), len(victims))
        out["bystander_relogins"] = sum(1 for r in after if r.user not in victims)
    return out


def last_good_server(records: list[Record], before_s: float) -> dict[int, str]:
    """Each user's server of its last 200 answer that arrived before `before_s`."""
    last: dict[int, tuple[float, str]] = {}
    for r in records:
        good = r.status == 200 and r.server is not None and r.ended_s < before_s
        if good and (r.user not in last or last[r.user][0] < r.ended_s):
            last[r.user] = (r.ended_s, str(r.server))
    return {user: server for user, (_, server) in last.items()}


def moved_share(records: list[Record], at_s: float) -> float | None:
    """Share of users whose last answering server before `at_s` differs from their last one of the run."""
    before: dict[int, str] = {}
    end: dict[int, str] = {}
    for r in sorted(records, key=lambda r: r.ended_s):
        if r.server is None:
            continue
        (before if r.ended_s < at_s else end)[r.user] = r.server
    both = [user for user in before if user in end]
    return _share(sum(1 for user in both if before[user] != end[user]), len(both))


def cookie_effects(data: RunData) -> dict[str, float | int | None]:
    """Tampering and the readability of the sticky cookie (C12)."""
    tampered = sum(u.tampered for u in data.users)
    checks = sum(u.cookie_checks for u in data.users)
    forged = data.routes.get("forged-cookie", 0)
    return {
        "tampered": tampered,
        "forged_cookies": forged,
        "tamper_detected_share": _share(forged, tampered),
        "cookie_names_server": _share(sum(u.cookie_matches for u in data.users), checks),
    }


def cart_effects(users: list[UserOutcome]) -> dict[str, int | None]:
    """Acknowledged cart writes, and those missing at the end (the lost update of a shared store)."""
    counted = [u for u in users if u.cart_seen is not None]
    if not counted:
        return {"cart_writes": None, "lost_updates": None}
    return {
        "cart_writes": sum(u.cart_acked for u in counted),
        "lost_updates": sum(max(0, u.cart_acked - (u.cart_seen or 0)) for u in counted),
    }


def session_cookie_effects(records: list[Record], data: RunData) -> dict[str, float | int | None]:
    """What the session cookie costs and allows: its size, lost whole-session writes, replays, forgeries."""
    users = data.users
    counted = [u for u in users if u.prefs_seen is not None]
    sizes = [r.session_bytes for r in records if r.session_bytes]
    replayed = [u for u in users if u.replayed]
    forged = [u.forged_answers for u in users if u.forged_answers]

    def answers(match: Callable[[int], bool]) -> int:
        return sum(n for f in forged for status, n in f.items() if match(status))

    return {
        "prefs_writes": sum(u.prefs_acked for u in counted) if counted else None,
        "lost_prefs": sum(max(0, u.prefs_acked - (u.prefs_seen or 0)) for u in counted) if counted else None,
        "too_large": sum(1 for r in records if r.status == 413),
        "session_cookie_bytes_max": max(sizes) if sizes else None,
        "session_bytes_per_request": round(sum(sizes) / len(records), 1) if records else None,
        "replay_users": len(replayed),
        "replays_accepted": sum(u.replays_accepted for u in replayed) if replayed else None,
        "replays_refused": sum(u.replays_refused for u in replayed) if replayed else None,
        "replay_window_s": round(max(u.replay_window_s for u in replayed), 3) if replayed else None,
        "session_forgeries": answers(lambda _: True) if forged else 0,
        "forged_anonymous": answers(lambda status: status == 401) if forged else None,
        "forged_accepted": answers(lambda status: status == 200) if forged else None,
        "forged_errors": answers(lambda status: status >= 500 or status == 0) if forged else None,
        "forged_sessions": None if data.store_counts is None else data.store_counts.get("forged"),
    }


def slowed_servers(faults: Iterable[AppliedFault]) -> set[str]:
    """The servers whose balancer link (lb->X) a set-link fault changed during the run (F7's slow server)."""
    return {
        f.link.removeprefix("lb->")
        for f in faults
        if f.action == "set-link" and f.link and f.link.startswith("lb->") and f.applied_s is not None and not f.error
    }


def slow_server_effects(records: list[Record], data: RunData) -> dict[str, float | int | None]:
    """The slowed servers' share of the answers, and the latency of the users pinned to them against the others'."""
    slowed = slowed_servers(data.faults)
    answered = [r for r in records if r.server is not None]
    out: dict[str, float | int | None] = {
        "slowed_share": _share(sum(1 for r in answered if r.server in slowed), len(answered)) if slowed else None,
        "slowed_users": None,
        "slowed_users_p50_ms": None,
        "other_users_p50_ms": None,
    }
    pinned = {u.index: u.pinned_server for u in data.users if u.pinned_server is not None}
    if not slowed or not pinned:  # no slow server, or no cookie that pins a user to one
        return out
    victims = {index for index, server in pinned.items() if server in slowed}
    out["slowed_users"] = len(victims)
    out["slowed_users_p50_ms"] = latency([r for r in records if r.user in victims])["p50_ms"]
    out["other_users_p50_ms"] = latency([r for r in records if r.user in pinned and r.user not in victims])["p50_ms"]
    return out


def named_users(users: Iterable[UserOutcome]) -> dict[str, list[dict[str, Any]]]:
    """Who lost cart writes and who logged in again (NAMED_USERS), each with the count, the most first."""
    lost = {u.name or str(u.index): u.cart_acked - u.cart_seen for u in users
            if u.cart_seen is not None and u.cart_acked > u.cart_seen}  # fmt: skip
    relogged = {u.name or str(u.index): u.relogins for u in users if u.relogins}

    def listed(counts: dict[str, int]) -> list[dict[str, Any]]:
        return [{"user": user, "count": n} for user, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    return {"lost_updates": listed(lost), "relogins": listed(relogged)}


def reconfigured(before: dict[str, Any] | None, after: dict[str, Any] | None) -> int | None:
    """How many servers that ran before the run were restarted (a new pid or restart count) by its end."""
    if before is None or after is None:
        return None
    then = {s["id"]: (s.get("pid"), s.get("restarts")) for s in before.get("servers", [])}
    now = {s["id"]: (s.get("pid"), s.get("restarts")) for s in after.get("servers", [])}
    return sum(1 for server_id, state in then.items() if now.get(server_id) != state)


def _share(part: Any, whole: int) -> float | None:
    return round(part / whole, 3) if whole else None
