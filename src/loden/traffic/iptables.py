"""iptables mode: flannel's FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) chains.

The rule text is in :mod:`loden.traffic.iptables_rules`; reading the dumps and computing
the repair payloads (how one chain is reconciled) is in :mod:`loden.traffic.iptables_save`.
This module picks the binaries and runs them.

The backend (nf_tables or legacy) is the one ``iptables --version`` reports, and the
matching ``iptables-nft*``/``iptables-legacy*`` binaries are used; rules found in the
*other* backend are reported once, because both backends filter every packet and a
legacy ``FORWARD`` policy DROP (old kube-proxy or Docker) cannot be overridden by
nf_tables ACCEPT rules (user pain point 13).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from loden.errors import TrafficRulesError
from loden.traffic.base import Networks
from loden.traffic.commands import Commands, Runner
from loden.traffic.iptables_rules import (
    FWD_CHAIN,
    POSTRTG_CHAIN,
    ChainSpec,
    Family,
    Network,
    Rule,
    forward_chain,
    masq_chain,
)
from loden.traffic.iptables_save import (
    SavedTable,
    diff_chain,
    parse_save,
    removal_payload,
    restore_payload,
    stale_rules,
)
from loden.traffic.nft_generation import GenerationChoice, VerifiedAt, generation_source

log = logging.getLogger(__name__)

#: First iptables release with ``--random-fully`` and ``iptables-restore --wait``.
RANDOM_FULLY_MIN_VERSION = (1, 6, 2)
WAIT_MIN_VERSION = (1, 6, 2)
#: The nftables-mode tables, deleted when running in iptables mode (spec §7.1).
FLANNEL_NFT_TABLES: tuple[tuple[str, str], ...] = (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"))

Backend = Literal["nf_tables", "legacy"]
BackendChoice = Literal["auto", "nf_tables", "legacy"]

_VERSION_RE = re.compile(r"v(\d+)\.(\d+)(?:\.(\d+))?(?:\s*\(([\w-]+)\))?")


# --------------------------------------------------------------------------- binaries


def parse_version(text: str) -> tuple[tuple[int, int, int], Backend]:
    """``iptables v1.8.9 (nf_tables)`` -> ((1, 8, 9), "nf_tables"); releases before 1.8
    print no backend and are legacy."""
    m = _VERSION_RE.search(text)
    if m is None:
        raise TrafficRulesError(
            f"cannot read the iptables version from {text.strip()[:80]!r}: "
            "install iptables >= 1.4 or set EnableNFTables"
        )
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    backend: Backend = "nf_tables" if (m.group(4) or "").startswith("nf_tables") else "legacy"
    return version, backend


@dataclass(frozen=True, slots=True)
class Xtables:
    """The binaries of one family and backend, and what that iptables release supports."""

    family: Family
    backend: Backend
    version: tuple[int, int, int]
    cmd: str
    save: str
    restore: str

    @property
    def supports_random_fully(self) -> bool:
        return self.version >= RANDOM_FULLY_MIN_VERSION

    def restore_argv(self) -> list[str]:
        wait = ["--wait"] if self.version >= WAIT_MIN_VERSION else []
        return [self.restore, "--noflush", *wait]


def _base(family: Family) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _suffix(backend: Backend) -> str:
    return "nft" if backend == "nf_tables" else "legacy"


def _suffixed(runner: Runner, family: Family, backend: Backend) -> tuple[str, str, str] | None:
    base = f"{_base(family)}-{_suffix(backend)}"
    names = (base, f"{base}-save", f"{base}-restore")
    return names if all(runner.has(n) for n in names) else None


async def detect_xtables(runner: Runner, family: Family, choice: BackendChoice = "auto") -> Xtables:
    """Pick the binaries: the backend ``iptables --version`` reports (or ``choice``),
    through its ``-nft``/``-legacy`` names when they exist (so an alternatives switch
    during the agent's life cannot flip the backend under its rules)."""
    base = _base(family)
    if choice == "auto":
        if not runner.has(base):
            raise TrafficRulesError(
                f"{base} not found: install the iptables package or enable EnableNFTables"
            )
        version, backend = parse_version((await runner.run([base, "--version"])).text)
        names = _suffixed(runner, family, backend) or (base, f"{base}-save", f"{base}-restore")
    else:
        backend = choice
        found = _suffixed(runner, family, backend)
        if found is None:
            raise TrafficRulesError(
                f"{base}-{_suffix(backend)} (with -save and -restore) not found: "
                "install them or let Loden pick the backend (auto)"
            )
        names = found
        version, _ = parse_version((await runner.run([names[0], "--version"])).text)
    return Xtables(family, backend, version, *names)


async def available_xtables(runner: Runner, family: Family) -> list[Xtables]:
    """Every installed backend of ``family`` (for cleanups that must leave nothing)."""
    out: list[Xtables] = []
    for backend in ("nf_tables", "legacy"):
        if _suffixed(runner, family, backend) is not None:
            out.append(await detect_xtables(runner, family, backend))
    if not out and runner.has(_base(family)):
        out.append(await detect_xtables(runner, family, "auto"))
    return out


def other_backend_report(tables: Mapping[str, SavedTable]) -> tuple[int, list[str], bool]:
    """(rule count, tables holding rules, filter FORWARD policy is DROP) of a dump."""
    names = sorted(n for n, t in tables.items() if t.rules)
    count = sum(len(t.rules) for t in tables.values())
    filt = tables.get("filter")
    forward_drop = filt is not None and filt.policies.get("FORWARD") == "DROP"
    return count, names, forward_drop


async def warn_if_other_backend_in_use(runner: Runner, xt: Xtables) -> bool:
    """Warn once if the backend Loden does *not* use holds rules (pain point 13).

    The other backend's save runs without ``-t``: it then lists only tables that exist
    and does not instantiate new ones (a legacy table, once created, hooks packets).
    """
    other: Backend = "legacy" if xt.backend == "nf_tables" else "nf_tables"
    names = _suffixed(runner, xt.family, other)
    if names is None:
        return False
    res = await runner.run([names[1]], check=False)
    if res.returncode != 0:
        log.debug("%s failed (%s); not checking for mixed backends", names[1], res.error_text)
        return False
    count, tables, forward_drop = other_backend_report(parse_save(res.text))
    if count == 0 and not forward_drop:
        return False
    log.warning(
        "iptables backend mismatch: Loden writes its rules with %s (%s, the backend `%s "
        "--version` reports) but the %s backend also holds %d rule(s) in table(s) %s%s, "
        "e.g. from kube-proxy or Docker; both backends see every packet, so a DROP there "
        "is not overridden by Loden's ACCEPT rules: run every component with one backend "
        "(update-alternatives --set %s /usr/sbin/%s-%s)",
        xt.cmd,
        xt.backend,
        _base(xt.family),
        other,
        count,
        ",".join(tables) or "-",
        " and FORWARD policy DROP" if forward_drop else "",
        _base(xt.family),
        _base(xt.family),
        _suffix(xt.backend),
    )
    return True


async def remove_chains(runner: Runner, xt: Xtables) -> bool:
    """Remove FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) with their jumps, in one
    backend and family. Returns True if anything was removed."""
    res = await runner.run([xt.save], check=False)  # no -t: do not instantiate tables
    if res.returncode != 0:
        raise TrafficRulesError(
            f"{xt.save} failed ({res.error_text.strip()[:120]}): cannot remove the "
            f"{POSTRTG_CHAIN}/{FWD_CHAIN} chains; remove them by hand with {xt.cmd} -F/-X"
        )
    tables = parse_save(res.text)
    removed = False
    for table_name, chain in (("nat", POSTRTG_CHAIN), ("filter", FWD_CHAIN)):
        table = tables.get(table_name)
        payload = None if table is None else removal_payload(table, [chain])
        if payload is None:
            continue
        log.info("Removing iptables chain %s (table %s, %s)", chain, table_name, xt.cmd)
        await runner.run(xt.restore_argv(), stdin=payload)
        removed = True
    return removed


async def delete_nft_tables(runner: Runner) -> bool:
    """Delete flannel's nftables-mode tables if present. Errors are only logged, like
    flannel (a host without nft simply has none). Returns True if any was deleted."""
    if not runner.has("nft"):
        log.debug("nft not installed: no nftables tables of flannel to clean up")
        return False
    res = await runner.run(["nft", "list", "tables"], check=False)
    if res.returncode != 0:
        log.warning("nft list tables failed: %s; not cleaning nftables", res.error_text.strip())
        return False
    listed = {
        tuple(line.split()[1:3]) for line in res.text.splitlines() if line.startswith("table")
    }
    present = [t for t in FLANNEL_NFT_TABLES if t in listed]
    if not present:
        return False
    script = "".join(f"delete table {fam} {name}\n" for fam, name in present)
    res = await runner.run(["nft", "-f", "-"], stdin=script.encode(), check=False)
    if res.returncode != 0:
        log.warning("deleting nftables tables %s failed: %s", present, res.error_text.strip())
        return False
    log.info("Deleted nftables tables %s", ", ".join(f"{f} {n}" for f, n in present))
    return True


# --------------------------------------------------------------------------- manager


class IptablesManager:
    """:class:`~loden.traffic.base.TrafficManager` for iptables mode (the default).

    Every ``ensure_*`` call checks the kernel again, so a restart, an ``iptables -F`` by
    an admin or a firewall reload are all repaired by the next call. With the nf_tables
    backend the check is cheap while nothing changes: a chain verified at nf_tables
    generation G is not dumped again while the generation is still G (any committed
    edit, by anyone, bumps it; see :mod:`loden.traffic.nft_generation`). The legacy
    backend has no generation: it is dumped every time. Calls are serialised by a lock.

    ``generation`` is where that id is read: ``"auto"`` derives it from a
    :class:`~loden.traffic.commands.Commands` runner's namespace (none for other
    runners), ``None`` turns the shortcut off.
    """

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        backend: BackendChoice = "auto",
        generation: GenerationChoice = "auto",
    ) -> None:
        self._runner: Runner = runner if runner is not None else Commands()
        self._choice: BackendChoice = backend
        self._verified = VerifiedAt(generation_source(self._runner, generation))
        self._tools: dict[Family, Xtables] = {}
        #: (family, chain) already reconciled once: later repairs are resync repairs.
        self._installed: set[tuple[Family, str]] = set()
        self._announced: set[str] = set()
        self._lock = asyncio.Lock()

    async def xtables(self, family: Family) -> Xtables:
        """The binaries for ``family`` (detected once, with the mixed-backend check)."""
        xt = self._tools.get(family)
        if xt is None:
            xt = await detect_xtables(self._runner, family, self._choice)
            log.info(
                "Using %s (iptables %s, %s backend)",
                xt.cmd,
                ".".join(map(str, xt.version)),
                xt.backend,
            )
            await warn_if_other_backend_in_use(self._runner, xt)
            self._tools[family] = xt
            self._announce(f"check-{xt.backend}", self._check_description(xt))
        return xt

    async def check(self, *, ipv6: bool) -> None:
        """Detect the iptables binaries now (missing ones raise), not at the first rule."""
        await self.xtables(4)
        if ipv6:
            await self.xtables(6)

    async def cleanup_other_mode(self) -> None:
        """Delete the nftables-mode tables ``ip flannel-ipv4`` / ``ip6 flannel-ipv6``."""
        async with self._lock:
            await delete_nft_tables(self._runner)

    async def ensure_masq_rules(
        self, current: Networks, previous: Networks, *, random_fully: bool
    ) -> bool:
        """Install/repair FLANNEL-POSTRTG for each family with a network and subnet.

        ``random_fully`` is the caller's wish (``not --ip-masq-fully-random-disable``);
        ``--random-fully`` is used only if this iptables supports it too. ``previous``
        holds the subnet.env values of the last run: rules built from them that the
        current values do not produce are deleted (recycle step).
        """
        pairs: list[tuple[Family, Network | None, Network | None, Network | None, Network | None]]
        pairs = [
            (4, current.network, current.subnet, previous.network, previous.subnet),
            (6, current.ipv6_network, current.ipv6_subnet,
             previous.ipv6_network, previous.ipv6_subnet),
        ]  # fmt: skip
        changed = False
        async with self._lock:
            for family, net, sub, prev_net, prev_sub in pairs:
                if net is None or sub is None:
                    continue
                xt = await self.xtables(family)
                want = masq_chain(net, sub, random_fully=random_fully and xt.supports_random_fully)
                stale: tuple[Rule, ...] = ()
                if (
                    prev_net is not None
                    and prev_sub is not None
                    and (prev_net, prev_sub)
                    != (
                        net,
                        sub,
                    )
                ):
                    # The old rules may have been written with or without --random-fully.
                    olds = [masq_chain(prev_net, prev_sub, random_fully=v) for v in (True, False)]
                    stale = stale_rules(olds, want)
                self._announce("masq", "Setting up masking rules")
                changed |= await self._reconcile(xt, want, stale)
        return changed

    async def ensure_forward_rules(self, current: Networks) -> bool:
        """Install/repair FLANNEL-FWD (ACCEPT from/to the cluster network) per family.

        The jump is appended to ``FORWARD``: Docker inserts its own chains at the top
        and they return for non-Docker traffic, so with Docker's policy DROP overlay
        traffic still reaches these ACCEPT rules.
        """
        nets: list[tuple[Family, Network | None]]
        nets = [(4, current.network), (6, current.ipv6_network)]
        changed = False
        async with self._lock:
            for family, net in nets:
                if net is None:
                    continue
                xt = await self.xtables(family)
                # flannel's words (spec §11 item 16); the policy itself is never changed.
                self._announce(
                    "fwd",
                    "Changing default FORWARD chain policy to ACCEPT "
                    f"(as flannel: by ACCEPT rules in {FWD_CHAIN}; the policy is untouched)",
                )
                changed |= await self._reconcile(xt, forward_chain(net), ())
        return changed

    async def remove_all(self) -> bool:
        """Remove Loden's chains and their jumps (both families, the backend in use).

        Never called on shutdown (flannel keeps its rules so traffic survives a
        restart); meant for an explicit cleanup flag. Returns True if anything was removed.
        """
        families: tuple[Family, ...] = (4, 6)
        removed = False
        async with self._lock:
            for family in families:
                xt = self._tools.get(family)
                if xt is None:
                    if not self._runner.has(_base(family)):
                        continue
                    xt = await detect_xtables(self._runner, family, self._choice)
                removed |= await remove_chains(self._runner, xt)
            self._installed.clear()
            self._verified.forget()
        return removed

    def _announce(self, key: str, message: str) -> None:
        if key not in self._announced:
            self._announced.add(key)
            log.info("%s", message)

    def _check_description(self, xt: Xtables) -> str:
        if xt.backend == "legacy":
            return "rules check: iptables-legacy, dump every --iptables-resync pass"
        if self._verified.source is None:
            return "rules check: no nf_tables generation source for this runner, dump every pass"
        return "rules check: nf_tables generation id (dump only after a change)"

    async def _reconcile(self, xt: Xtables, want: ChainSpec, stale: Sequence[Rule]) -> bool:
        """At most one dump, one diff, and at most one iptables-restore for one chain.

        The generation is read *before* the dump: an edit racing with the dump bumps it
        past the recorded value, so the next call dumps again.
        """
        key = (xt.family, want.chain)
        first = key not in self._installed
        self._installed.add(key)
        checked = (want, tuple(stale))
        gen = self._verified.generation() if xt.backend == "nf_tables" else None
        if self._verified.unchanged(key, checked, gen):
            return False
        dump = await self._runner.run([xt.save, "-t", want.table])
        table = parse_save(dump.text).get(want.table, SavedTable(want.table))
        drift = diff_chain(table, want, stale)
        if drift.ok:
            self._verified.verified(key, checked, gen)
            return False
        # Not recorded after our own write: the next call dumps and records what it sees.
        self._verified.forget(key)
        where = f"{xt.cmd} table {want.table} chain {want.chain}"
        if drift.stale or drift.stale_in_chain:
            log.info("Recycling rules built from the previous network/subnet (%s)", where)
        if first:
            log.info("Installing iptables rules (%s: %s)", where, drift.describe())
        elif drift.missing or drift.chain_missing:
            log.warning(
                "Some iptables rules are missing; deleting and recreating rules (%s: %s)",
                where,
                drift.describe(),
            )
        else:
            log.warning(
                "Unexpected or misordered iptables rules; deleting and recreating rules (%s: %s)",
                where,
                drift.describe(),
            )
        await self._runner.run(xt.restore_argv(), stdin=restore_payload(want, drift))
        return True
