"""iptables mode: flannel's FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) chains.

The rules are byte-for-byte flannel's (spec §7.2, §7.3), so a node can switch between
flanneld and Loden without leaving duplicates behind, and ``iptables -t nat -S`` shows
the same e2e golden.

How a call reconciles one chain of one family:

1. One ``iptables-save -t <table>`` dump (not one ``iptables -C`` per rule).
2. :func:`diff_chain` compares the dump with the wanted :class:`ChainSpec`: the chain
   must exist and hold exactly the wanted rules in order (flannel only checks that each
   rule exists somewhere; Loden also repairs extra rules and ordering drift inside its own
   chain), the jump from ``POSTROUTING``/``FORWARD`` must exist exactly once, and rules
   built from the previous subnet.env values (the *recycle* step) must be gone.
3. If anything is off, one ``iptables-restore --noflush [--wait]`` payload repairs it
   atomically: ``:CHAIN - [0:0]`` (create-or-flush, flannel's step 2, here inside the same
   transaction so there is no window without masquerading), then flannel's step 3 lines
   (``-D`` for rules that currently exist, ``-A`` for every wanted rule, the token after
   ``--comment`` in double quotes), then ``COMMIT``.

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
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from loden.errors import TrafficRulesError
from loden.traffic.base import Networks
from loden.traffic.commands import Commands, Runner

log = logging.getLogger(__name__)

MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
POSTRTG_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
#: kube-proxy marks packets it will masquerade itself with this bit (avoid double NAT).
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
#: First iptables release with ``--random-fully`` and ``iptables-restore --wait``.
RANDOM_FULLY_MIN_VERSION = (1, 6, 2)
WAIT_MIN_VERSION = (1, 6, 2)
#: The nftables-mode tables, deleted when running in iptables mode (spec §7.1).
FLANNEL_NFT_TABLES: tuple[tuple[str, str], ...] = (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"))

Family = Literal[4, 6]
Backend = Literal["nf_tables", "legacy"]
BackendChoice = Literal["auto", "nf_tables", "legacy"]
Network = IPv4Network | IPv6Network

_VERSION_RE = re.compile(r"v(\d+)\.(\d+)(?:\.(\d+))?(?:\s*\(([\w-]+)\))?")
_NEEDS_QUOTES = re.compile(r"[\s\"'\\]")


# --------------------------------------------------------------------------- rules


def quote_tokens(tokens: Iterable[str]) -> list[str]:
    """Tokens as iptables-restore reads them: the ``--comment`` value always in double
    quotes (like flannel's payload), any other token only if it needs quoting."""
    out: list[str] = []
    after_comment = False
    for token in tokens:
        if after_comment or not token or _NEEDS_QUOTES.search(token):
            escaped = token.replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'"{escaped}"')
        else:
            out.append(token)
        after_comment = token == "--comment"
    return out


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: ``<op> <chain> <spec...>`` in ``table``."""

    table: str
    chain: str
    spec: tuple[str, ...]

    def line(self, op: str = "-A") -> str:
        """The rule as ``iptables -S`` prints it and ``iptables-restore`` reads it."""
        return " ".join((op, self.chain, *quote_tokens(self.spec)))


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """A chain Loden owns: its rules in order, and the one jump that makes it reachable."""

    family: Family
    table: str
    chain: str
    #: The built-in chain holding the jump (``POSTROUTING`` or ``FORWARD``).
    parent: str
    jump: Rule
    rules: tuple[Rule, ...]

    def golden_lines(self) -> list[str]:
        """What ``iptables -t <table> -S`` lists for Loden (without the ``-P`` lines and
        without other components' rules): ``-N``, the jump, then the chain's rules."""
        return [f"-N {self.chain}", self.jump.line(), *(r.line() for r in self.rules)]


def _family(network: Network) -> Family:
    return 4 if network.version == 4 else 6


def masq_chain(network: Network, subnet: Network, *, random_fully: bool) -> ChainSpec:
    """flannel's masquerade rules for cluster network ``network`` and own ``subnet``
    (spec §7.2; ``random_fully`` must already include the iptables version check)."""
    if network.version != subnet.version:
        raise TrafficRulesError(
            f"masquerade rules need one IP family, got network {network} and subnet {subnet}: "
            "pass the IPv4 or the IPv6 pair"
        )
    fam = _family(network)
    n, s, mc = str(network), str(subnet), MULTICAST[fam]
    c = ("-m", "comment", "--comment", MASQ_COMMENT)
    rf = ("--random-fully",) if random_fully else ()

    def rule(*spec: str) -> Rule:
        return Rule("nat", POSTRTG_CHAIN, spec)

    return ChainSpec(
        family=fam,
        table="nat",
        chain=POSTRTG_CHAIN,
        parent="POSTROUTING",
        jump=Rule("nat", "POSTROUTING", (*c, "-j", POSTRTG_CHAIN)),
        rules=(
            rule("-m", "mark", "--mark", KUBE_PROXY_MARK, *c, "-j", "RETURN"),
            rule("-s", s, "-d", n, *c, "-j", "RETURN"),
            rule("-s", n, "-d", s, *c, "-j", "RETURN"),
            rule("!", "-s", n, "-d", s, *c, "-j", "RETURN"),
            rule("-s", n, "!", "-d", mc, *c, "-j", "MASQUERADE", *rf),
            rule("!", "-s", n, "-d", n, *c, "-j", "MASQUERADE", *rf),
        ),
    )


def forward_chain(network: Network) -> ChainSpec:
    """flannel's forward-accept rules for the cluster ``network`` (spec §7.3)."""
    n = str(network)
    c = ("-m", "comment", "--comment", FWD_COMMENT)
    return ChainSpec(
        family=_family(network),
        table="filter",
        chain=FWD_CHAIN,
        parent="FORWARD",
        jump=Rule("filter", "FORWARD", (*c, "-j", FWD_CHAIN)),
        rules=(
            Rule("filter", FWD_CHAIN, ("-s", n, *c, "-j", "ACCEPT")),
            Rule("filter", FWD_CHAIN, ("-d", n, *c, "-j", "ACCEPT")),
        ),
    )


# --------------------------------------------------------------------------- iptables-save


@dataclass(frozen=True, slots=True)
class SavedRule:
    """One ``-A`` line of an iptables-save dump."""

    chain: str
    spec: tuple[str, ...]
    #: The raw line; valid iptables-restore syntax, so ``-D`` + line[3:] deletes it.
    line: str

    def delete_line(self) -> str:
        return "-D " + self.line[3:]

    def jumps_to(self, chain: str) -> bool:
        spec = self.spec
        return any(spec[i] in ("-j", "-g") and spec[i + 1] == chain for i in range(len(spec) - 1))


@dataclass(frozen=True, slots=True)
class SavedTable:
    """One ``*table`` block of an iptables-save dump."""

    name: str
    #: chain -> policy (``ACCEPT``/``DROP`` for built-in chains, ``-`` for user chains).
    policies: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[SavedRule, ...] = ()

    def has_chain(self, chain: str) -> bool:
        return chain in self.policies

    def chain_specs(self, chain: str) -> list[tuple[str, ...]]:
        return [r.spec for r in self.rules if r.chain == chain]


def _split(text: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError:  # unbalanced quote in some foreign rule: compare it verbatim
        return tuple(text.split())


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse ``iptables-save`` output into tables (comments and counters ignored)."""
    tables: dict[str, SavedTable] = {}
    name: str | None = None
    policies: dict[str, str] = {}
    rules: list[SavedRule] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and "] " in line:  # "[pkts:bytes] -A ..." (iptables-save -c)
            line = line.split("] ", 1)[1].lstrip()
        if line.startswith("*"):
            name, policies, rules = line[1:].strip(), {}, []
        elif name is None:
            continue
        elif line == "COMMIT":
            tables[name] = SavedTable(name, policies, tuple(rules))
            name = None
        elif line.startswith(":"):
            parts = line[1:].split()
            if parts:
                policies[parts[0]] = parts[1] if len(parts) > 1 else "-"
        elif line.startswith("-A "):
            tokens = _split(line[3:])
            if tokens:
                rules.append(SavedRule(tokens[0], tokens[1:], line))
    if name is not None:  # truncated dump without COMMIT: keep what was read
        tables[name] = SavedTable(name, policies, tuple(rules))
    return tables


# --------------------------------------------------------------------------- diff + payload


@dataclass(frozen=True, slots=True)
class Drift:
    """How the kernel's chain differs from the wanted :class:`ChainSpec`."""

    chain_missing: bool
    #: The own chain's rules are not exactly the wanted ones in order (missing, extra,
    #: duplicated or reordered rules).
    chain_differs: bool
    #: Wanted rules (the jump included) not present at all.
    missing: tuple[Rule, ...]
    #: How many times the jump from the parent chain is present (wanted: exactly 1).
    jump_count: int
    #: Rules built from the previous network/subnet still present outside the own chain.
    stale: tuple[SavedRule, ...] = ()
    #: How many rules built from the previous network/subnet are inside the own chain.
    stale_in_chain: int = 0

    @property
    def rebuild_chain(self) -> bool:
        return self.chain_missing or self.chain_differs

    @property
    def fix_jump(self) -> bool:
        return self.jump_count != 1

    @property
    def ok(self) -> bool:
        return not (self.rebuild_chain or self.fix_jump or self.stale)

    def describe(self) -> str:
        """A short human summary for the log line."""
        jump_missing = self.jump_count == 0  # then the jump is missing[0]
        rules_missing = len(self.missing) - int(jump_missing)
        if self.chain_missing:
            parts = ["chain missing"]
        else:
            parts = ["jump missing"] if jump_missing else []
            if rules_missing:
                parts.append(f"{rules_missing} rule(s) missing")
            elif self.chain_differs:
                parts.append("rules out of order or unexpected rules in the chain")
        if self.jump_count > 1:
            parts.append(f"jump present {self.jump_count} times")
        if self.stale or self.stale_in_chain:
            parts.append(f"{len(self.stale) + self.stale_in_chain} rule(s) of the previous subnet")
        return ", ".join(parts) or "in sync"


def stale_rules(previous: Sequence[ChainSpec], current: ChainSpec) -> tuple[Rule, ...]:
    """The recycle set: rules built from previous subnet.env values that the current
    values do not produce again (spec §7.2 step 1)."""
    wanted = {(current.jump.chain, current.jump.spec)} | {(r.chain, r.spec) for r in current.rules}
    out: list[Rule] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for spec in previous:
        for rule in (spec.jump, *spec.rules):
            key = (rule.chain, rule.spec)
            if key not in wanted and key not in seen:
                seen.add(key)
                out.append(rule)
    return tuple(out)


def diff_chain(table: SavedTable, want: ChainSpec, stale: Sequence[Rule] = ()) -> Drift:
    """Compare one dumped table with the wanted chain (pure; see the module docstring)."""
    actual = table.chain_specs(want.chain)
    wanted = [r.spec for r in want.rules]
    parent_specs = table.chain_specs(want.parent)
    jump_count = parent_specs.count(want.jump.spec)
    missing = tuple(r for r in want.rules if r.spec not in actual)
    if jump_count == 0:
        missing = (want.jump, *missing)
    stale_keys = {(r.chain, r.spec) for r in stale}
    stale_found = tuple(
        r for r in table.rules if r.chain != want.chain and (r.chain, r.spec) in stale_keys
    )
    stale_in_chain = sum(1 for spec in actual if (want.chain, spec) in stale_keys)
    return Drift(
        chain_missing=not table.has_chain(want.chain),
        chain_differs=actual != wanted,
        missing=missing,
        jump_count=jump_count,
        stale=stale_found,
        stale_in_chain=stale_in_chain,
    )


def restore_payload(want: ChainSpec, drift: Drift) -> bytes:
    """The one iptables-restore ``--noflush`` payload that turns ``drift`` into ``want``.

    ``:CHAIN - [0:0]`` creates the chain or, in ``--noflush`` mode, flushes it (both
    backends); so no ``-D`` is needed for the chain's own rules, and extra or misordered
    rules disappear in the same atomic transaction.
    """
    lines = [f"*{want.table}"]
    rebuild = drift.rebuild_chain
    if rebuild:
        lines.append(f":{want.chain} - [0:0]")
    lines.extend(r.delete_line() for r in drift.stale)
    if drift.fix_jump:
        lines.extend([want.jump.line("-D")] * drift.jump_count)
        lines.append(want.jump.line("-A"))
    if rebuild:
        lines.extend(r.line("-A") for r in want.rules)
    lines.append("COMMIT")
    return ("\n".join(lines) + "\n").encode()


def removal_payload(table: SavedTable, chains: Sequence[str]) -> bytes | None:
    """Payload removing ``chains`` properly: first every rule jumping to them, then
    flush, then delete (flannel's nftables-mode cleanup skips the first step, so the
    delete fails and the chain stays; spec §11 item 9). None if nothing is there."""
    lines: list[str] = []
    for rule in table.rules:
        if rule.chain not in chains and any(rule.jumps_to(c) for c in chains):
            lines.append(rule.delete_line())
    present = [c for c in chains if table.has_chain(c)]
    lines.extend(f"-F {c}" for c in present)
    lines.extend(f"-X {c}" for c in present)
    if not lines:
        return None
    return ("\n".join([f"*{table.name}", *lines, "COMMIT"]) + "\n").encode()


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

    Stateless towards the kernel: every ``ensure_*`` call reads the tables again, so a
    restart, an ``iptables -F`` by an admin or a firewall reload are all repaired by the
    next call. Calls are serialised by a lock.
    """

    def __init__(self, runner: Runner | None = None, *, backend: BackendChoice = "auto") -> None:
        self._runner: Runner = runner if runner is not None else Commands()
        self._choice: BackendChoice = backend
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
        return xt

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
        return removed

    def _announce(self, key: str, message: str) -> None:
        if key not in self._announced:
            self._announced.add(key)
            log.info("%s", message)

    async def _reconcile(self, xt: Xtables, want: ChainSpec, stale: Sequence[Rule]) -> bool:
        """One dump, one diff, and at most one iptables-restore for one chain."""
        key = (xt.family, want.chain)
        first = key not in self._installed
        self._installed.add(key)
        dump = await self._runner.run([xt.save, "-t", want.table])
        table = parse_save(dump.text).get(want.table, SavedTable(want.table))
        drift = diff_chain(table, want, stale)
        if drift.ok:
            return False
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
