"""LeaseWatcher: snapshot/event diffs, own-lease filtering, robustness."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from loden.lease_watch import LeaseWatcher
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

NET = IPv4Network("10.5.0.0/16")


def lease(n: int, ip: str | None = None, kind: str = "vxlan") -> Lease:
    return Lease(
        IPv4Network(f"10.5.{n}.0/24"), LeaseAttrs(IPv4Address(ip or f"192.168.0.{n}"), kind)
    )


def test_snapshot_diff_and_own_filtered() -> None:
    w = LeaseWatcher(lease(1), NET)
    events = w.reset([lease(1), lease(2), lease(3)])
    assert sorted(e.lease.key for e in events) == ["10.5.2.0-24", "10.5.3.0-24"]
    assert all(e.kind is EventKind.ADDED for e in events)
    events = w.reset([lease(3), lease(4)])
    assert {(e.kind, e.lease.key) for e in events} == {
        (EventKind.REMOVED, "10.5.2.0-24"),
        (EventKind.ADDED, "10.5.4.0-24"),
    }
    assert set(w.peers) == {"10.5.3.0-24", "10.5.4.0-24"}


def test_renewal_is_not_a_change_but_new_attrs_are() -> None:
    w = LeaseWatcher(lease(1), NET)
    w.reset([lease(2)])
    assert w.update([LeaseEvent(EventKind.ADDED, lease(2))]) == []
    changed = w.update([LeaseEvent(EventKind.ADDED, lease(2, ip="192.168.9.9"))])
    assert len(changed) == 1 and w.peers["10.5.2.0-24"].attrs.public_ip == IPv4Address(
        "192.168.9.9"
    )


def test_removed_carries_the_stored_attrs_and_unknown_is_ignored() -> None:
    w = LeaseWatcher(lease(1), NET)
    w.reset([lease(2)])
    bare = Lease(IPv4Network("10.5.2.0/24"), LeaseAttrs(IPv4Address("0.0.0.0")))
    out = w.update([LeaseEvent(EventKind.REMOVED, bare), LeaseEvent(EventKind.REMOVED, lease(9))])
    assert [e.lease for e in out] == [lease(2)]


def test_lease_outside_network_is_refused() -> None:
    w = LeaseWatcher(lease(1), NET)
    outsider = Lease(IPv4Network("10.6.0.0/24"), LeaseAttrs(IPv4Address("192.168.0.7")))
    assert w.reset([outsider, lease(2)]) == [LeaseEvent(EventKind.ADDED, lease(2))]


def test_duplicate_public_ip_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    w = LeaseWatcher(lease(1), NET)
    w.reset([lease(2, ip="192.168.9.9")])
    w.update([LeaseEvent(EventKind.ADDED, lease(3, ip="192.168.9.9"))])
    w.update([LeaseEvent(EventKind.ADDED, lease(4))])
    w.reset([lease(2, ip="192.168.9.9"), lease(3, ip="192.168.9.9"), lease(4)])
    warnings = [r for r in caplog.records if "all claim public IP 192.168.9.9" in r.message]
    assert len(warnings) == 1
    w.update([LeaseEvent(EventKind.REMOVED, lease(3))])
    w.update([LeaseEvent(EventKind.ADDED, lease(5, ip="192.168.9.9"))])
    assert len([r for r in caplog.records if "all claim public IP" in r.message]) == 2


def test_a_relist_keeps_the_lease_objects_already_held() -> None:
    """The data plane holds the objects the watcher handed out: a relist's equal
    copies must not become a second set of every lease (issue 14)."""
    w = LeaseWatcher(lease(1), NET)
    w.reset([lease(2), lease(3)])
    held = dict(w.peers)
    changed = lease(3, ip="192.168.9.3")
    assert w.reset([lease(2), changed]) == [LeaseEvent(EventKind.ADDED, changed)]
    assert w.peers["10.5.2.0-24"] is held["10.5.2.0-24"]
    assert w.peers["10.5.3.0-24"] is changed
    # The map's keys too: the snapshot's key strings would outlive the snapshot.
    kept = next(key for key in w.peers if key == "10.5.2.0-24")
    assert kept is held["10.5.2.0-24"].key
