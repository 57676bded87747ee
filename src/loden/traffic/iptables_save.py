"""Reading ``iptables-save`` dumps and working out the repair of one chain.

Pure (dump text in, restore payload out) and apart from the code that runs the binaries,
so every reconcile decision can be tested without iptables.

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
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from loden.traffic.iptables_rules import ChainSpec, Rule


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
