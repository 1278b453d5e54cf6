"""The cluster's session table on an injected clock: how long sessions and tombstones are kept."""

from __future__ import annotations

from lbsession.appserver.cluster.table import SessionTable

SID = "S" * 43
LONG_TTL_S = 1800.0  # the default session TTL: 30 minutes
TOMBSTONE_TTL_S = 60.0


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table_with_clock(node_id: str = "node-1") -> tuple[SessionTable, FakeClock]:
    clock = FakeClock()
    return SessionTable(node_id, tombstone_ttl_s=TOMBSTONE_TTL_S, clock=clock), clock


def test_a_dropped_session_is_purged_after_the_tombstone_ttl_not_its_session_ttl() -> None:
    table, clock = table_with_clock()
    table.write(SID, {"user": '"alice"'}, set(), LONG_TTL_S)
    clock.now += 10
    table.drop(SID)

    clock.now += TOMBSTONE_TTL_S - 1
    assert table.purge() == 0  # still remembered as deleted: a late write cannot bring it back
    clock.now += 2
    assert table.purge() == 1
    assert list(table.snapshot()) == []


def test_a_drop_from_a_peer_keeps_the_tombstone_only_for_the_tombstone_ttl() -> None:
    table, clock = table_with_clock()
    peer, _ = table_with_clock("node-2")
    table.apply(peer.write(SID, {"user": '"alice"'}, set(), LONG_TTL_S))
    table.apply(peer.drop(SID))

    clock.now += TOMBSTONE_TTL_S + 1
    assert table.purge() == 1


def test_removing_the_last_attribute_leaves_a_short_lived_tombstone() -> None:
    table, clock = table_with_clock()
    table.write(SID, {"user": '"alice"'}, set(), LONG_TTL_S)
    table.write(SID, {}, {"user"}, LONG_TTL_S)

    clock.now += TOMBSTONE_TTL_S + 1
    assert table.purge() == 1


def test_a_write_with_live_attributes_keeps_the_longest_expiry() -> None:
    table, clock = table_with_clock()
    table.write(SID, {"user": '"alice"'}, set(), LONG_TTL_S)
    table.write(SID, {"cart": "[]"}, set(), 5.0)  # a shorter TTL must not shorten the session

    clock.now += LONG_TTL_S - 1
    assert table.load(SID, None) == {"user": '"alice"', "cart": "[]"}
    clock.now += 2
    assert table.load(SID, None) is None


def test_a_late_write_older_than_the_drop_does_not_revive_the_session() -> None:
    table, clock = table_with_clock()
    peer, _ = table_with_clock("node-2")
    stale = peer.write(SID, {"user": '"alice"'}, set(), LONG_TTL_S)
    table.apply(stale)
    table.apply(table.drop(SID))
    table.apply(stale)  # arrives again, late (a snapshot, a retry)

    assert table.load(SID, None) is None
    clock.now += TOMBSTONE_TTL_S + 1
    assert table.purge() == 1


def test_a_tombstone_passed_on_in_a_snapshot_keeps_only_the_time_it_had_left() -> None:
    table, clock = table_with_clock()
    peer, peer_clock = table_with_clock("node-2")
    peer.write(SID, {"user": '"alice"'}, set(), LONG_TTL_S)
    peer.drop(SID)
    peer_clock.now += 50  # 10 s of the tombstone left

    for change in peer.snapshot():  # a link that flaps sends it again and again
        table.apply(change)
        table.apply(change)

    clock.now += 11
    assert table.purge() == 1
