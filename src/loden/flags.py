"""A command-line parser with Go ``flag`` package syntax and ``FLANNELD_*`` variables.

flanneld users pass ``-etcd-endpoints=...``, ``--etcd-endpoints ...``, ``-ip-masq`` and
``-ip-masq=false`` interchangeably (the seed's unit file mixes ``--`` and ``-``).
argparse cannot express Go's rules (single-dash long names, booleans that accept
``=false`` but never a separate value), so this small parser does exactly Go's:

* ``-name``, ``--name``, ``-name=value``, ``--name=value``, ``-name value``
  (the last not for booleans); parsing stops at ``--`` or the first non-flag;
* booleans accept ``1 t T TRUE true True 0 f F FALSE false False``;
* after the command line, each flag not given on it takes
  ``FLANNELD_<NAME_WITH_UNDERSCORES>`` when that variable is non-empty; a repeatable
  flag takes exactly one value from its variable (no comma splitting).

One deliberate difference (issue #2): a bad flag or value raises :class:`UsageError`,
which the CLI turns into a one-line reason, the usage and exit status 2 (flannel
printed usage and exited 0, so supervisors never noticed a typo). An invalid
``FLANNELD_*`` value is treated the same way, naming the variable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loden.errors import UsageError

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {text!r} (use true or false)")


def parse_int(text: str) -> int:
    try:
        return int(text, 0) if text.lower().startswith(("0x", "0o", "0b")) else int(text)
    except ValueError:
        raise ValueError(f"invalid integer {text!r}") from None


@dataclass(frozen=True, slots=True)
class Flag:
    name: str
    default: Any
    help: str
    kind: str = "string"  # "string" | "bool" | "int" | "list"
    env: bool = True
    hidden: bool = False

    @property
    def env_name(self) -> str:
        return "FLANNELD_" + self.name.upper().replace("-", "_")

    def convert(self, text: str) -> Any:
        if self.kind == "bool":
            return parse_bool(text)
        if self.kind == "int":
            return parse_int(text)
        return text


@dataclass(slots=True)
class ParsedFlags:
    values: dict[str, Any]
    #: Flags given on the command line (their env vars were ignored).
    explicit: set[str] = field(default_factory=set)
    #: Flags taken from ``FLANNELD_*`` variables.
    from_env: set[str] = field(default_factory=set)
    positional: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


class FlagSet:
    def __init__(self, prog: str, flags: Sequence[Flag]) -> None:
        self.prog = prog
        self.flags = {f.name: f for f in flags}

    def usage(self) -> str:
        lines = [f"Usage: {self.prog} [OPTION]..."]
        for flag in sorted(self.flags.values(), key=lambda f: f.name):
            if flag.hidden:
                continue
            arg = "" if flag.kind == "bool" else (" int" if flag.kind == "int" else " string")
            lines.append(f"  -{flag.name}{arg}")
            default = "" if flag.default in ("", None, [], False) else f" (default {flag.default})"
            lines.append(f"    \t{flag.help}{default}")
        return "\n".join(lines) + "\n"

    def parse(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        env_skip: Callable[[str], bool] = lambda name: False,
        interspersed: bool = False,
    ) -> ParsedFlags:
        """Parse ``argv`` (without the program name), then apply ``env``.

        :raises UsageError: unknown flag, missing value, or a value that does not convert.
        ``-h``/``-help``/``--help`` raise :class:`HelpRequested`.
        """
        result = ParsedFlags(values={})
        for flag in self.flags.values():
            result.values[flag.name] = list(flag.default) if flag.kind == "list" else flag.default
        seen_lists: set[str] = set()
        args = list(argv)
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                result.positional.extend(args[i + 1 :])
                break
            if not arg.startswith("-") or arg == "-":
                if interspersed:  # operator commands: `config set JSON -etcd-...`
                    result.positional.append(arg)
                    i += 1
                    continue
                result.positional.extend(args[i:])
                break
            body = arg[2:] if arg.startswith("--") else arg[1:]
            if not body or body.startswith(("-", "=")):
                raise UsageError(f"bad flag syntax: {arg}")
            name, has_value, value = body.partition("=")
            if name in ("h", "help"):
                raise HelpRequested(self.usage())
            found = self.flags.get(name)
            if found is None:
                raise UsageError(f"flag provided but not defined: -{name}")
            flag = found
            if flag.kind == "bool":
                text = value if has_value else "true"
            elif has_value:
                text = value
            else:
                if i + 1 >= len(args):
                    raise UsageError(f"flag needs an argument: -{name}")
                i += 1
                text = args[i]
            self._assign(result, flag, text, origin=f"-{name}", seen_lists=seen_lists)
            result.explicit.add(flag.name)
            i += 1
        if env is not None:
            for flag in self.flags.values():
                if not flag.env or flag.name in result.explicit or env_skip(flag.name):
                    continue
                text = env.get(flag.env_name, "")
                if text:
                    self._assign(result, flag, text, origin=flag.env_name, seen_lists=set())
                    result.from_env.add(flag.name)
        return result

    @staticmethod
    def _assign(
        result: ParsedFlags, flag: Flag, text: str, *, origin: str, seen_lists: set[str]
    ) -> None:
        if flag.kind == "list":
            if flag.name not in seen_lists:
                result.values[flag.name] = []
                seen_lists.add(flag.name)
            result.values[flag.name].append(text)
            return
        try:
            result.values[flag.name] = flag.convert(text)
        except ValueError as exc:
            raise UsageError(f"invalid value {text!r} for {origin}: {exc}") from exc


class HelpRequested(Exception):
    """``-h``/``--help`` was given; carries the usage text."""

    def __init__(self, usage: str) -> None:
        super().__init__(usage)
        self.usage = usage
