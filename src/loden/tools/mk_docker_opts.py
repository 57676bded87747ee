"""``loden mk-docker-opts``: flannel's ``dist/mk-docker-opts.sh``, without a shell.

Classic installs run ``mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d
/run/flannel/subnet.env`` as ``ExecStartPost`` of flanneld and start dockerd with
``$DOCKER_NETWORK_OPTIONS`` from that file (spec §5.2, and the seed guide). This
module reproduces the script's options, defaults, exit codes and output bytes, in the
same order of steps:

1. options are parsed like the script's ``getopts "f:d:icmk:?h"`` (bundling, attached
   or separate option arguments, ``--``, stop at the first operand, dash's diagnostics
   ``Illegal option -x`` / ``No arg for -f option``), then usage and exit 1;
2. the flannel file is "sourced" if it is a regular file: a safe parser of the POSIX
   ``sh`` assignment subset such files contain (never executed; anything else is a
   :class:`~loden.errors.ParseError`, reported like a shell syntax error, exit 2);
3. ``DOCKER_OPT_BIP``/``_MTU``/``_IPMASQ`` are derived; a bad ``FLANNEL_IPMASQ`` is
   ``Invalid value of FLANNEL_IPMASQ: X`` and exit 1 before anything is written;
4. every variable whose *name* contains ``DOCKER_OPT_`` (from the environment, the file,
   or step 3), in the sorted order of the shell's ``set`` listing, becomes one
   ``NAME="VALUE"`` line (``-i``) and one ``" VALUE"`` piece of the combined variable
   (``-c``, named by ``-k``), which starts from that variable's current value;
5. the output is written (read first, then written: the seed uses the same file for
   ``-f`` and ``-d``);
6. the route-collision check runs ``ip route show`` and exits 1 *after* writing.

Deliberate differences, all invisible for files flanneld writes: the output replaces the
file atomically (temp file + rename, mode 0644) instead of truncating and appending; a
value is written with ``"``, ``\\``, ``$`` and backquote escaped so that sourcing the
result can never run code (the script pasted values raw); a value containing blanks is
written with its blanks collapsed instead of producing the broken lines the script's
unquoted ``for`` loop makes; a relative ``-f`` is read from the working directory (dash
would search ``$PATH``); a write failure exits 1 (the script printed the shell's error
and still exited 0).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loden.errors import ConfigError, ParseError, UsageError
from loden.files import replace_file

DEFAULT_FLANNEL_ENV = "/run/flannel/subnet.env"
DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_KEY = "DOCKER_OPTS"
PROG = "mk-docker-opts.sh"

# The script's usage text, byte for byte ($0 substituted); echo adds the last newline.
USAGE = """{prog} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to /run/flannel/subnet.env
\t-d\tPath to Docker env file to write to. Defaults to /run/docker_opts.env
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)

"""

# getopts "f:d:icmk:?h": option letter -> takes an argument.
_OPTSTRING = {"f": True, "d": True, "i": False, "c": False, "m": False, "k": True}
_USAGE_LETTERS = {"?", "h"}


@dataclass(frozen=True, slots=True)
class Options:
    """The parsed command line, with the script's defaults."""

    flannel_env: str = DEFAULT_FLANNEL_ENV
    docker_env: str = DEFAULT_DOCKER_ENV
    individual: bool = False
    combined: bool = False
    key: str = DEFAULT_KEY
    no_masq: bool = False


def parse_options(argv: Sequence[str]) -> Options:
    """Parse ``argv`` exactly as the script's ``getopts "f:d:icmk:?h"`` loop does.

    Like ``getopts``, parsing stops at ``--`` or at the first argument that is not an
    option; later arguments are ignored.

    :raises UsageError: ``-h``, ``-?``, an unknown option or a missing option argument;
        the message is dash's diagnostic (empty for ``-h``/``-?``).
    """
    values: dict[str, str] = {}
    flags: set[str] = set()
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            break
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            pos += 1
            if letter in _USAGE_LETTERS:
                raise UsageError("")
            if letter not in _OPTSTRING:
                raise UsageError(f"Illegal option -{letter}")
            if not _OPTSTRING[letter]:
                flags.add(letter)
                continue
            if pos < len(arg):
                values[letter] = arg[pos:]
            elif index < len(argv):
                values[letter] = argv[index]
                index += 1
            else:
                raise UsageError(f"No arg for -{letter} option")
            break
    return Options(
        flannel_env=values.get("f", DEFAULT_FLANNEL_ENV),
        docker_env=values.get("d", DEFAULT_DOCKER_ENV),
        individual="i" in flags,
        combined="c" in flags,
        key=values.get("k", DEFAULT_KEY),
        no_masq="m" in flags,
    )


# --------------------------------------------------------------------------------------
# A safe reader for the sh assignment subset found in env files.

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANKS = " \t"
_OPERATORS = "|&<>()"
_DQ_ESCAPES = '$`"\\'


class _Lexer:
    """Character scanner over the whole text (quotes may span lines, as in sh)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def take(self) -> str:
        char = self.text[self.pos]
        self.pos += 1
        if char == "\n":
            self.line += 1
        return char

    def error(self, reason: str) -> ParseError:
        return ParseError(f"line {self.line}: {reason}")


def parse_sh_assignments(text: str, scope: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that sourcing ``text`` with a POSIX shell would set, in order.

    Accepted: blank lines, ``#`` comments, ``NAME=VALUE`` (several per line), an
    ``export`` prefix (also ``export NAME``), ``;`` separators, values made of
    unquoted text, ``'single'`` and ``"double"`` quoted parts, backslash escapes and
    line continuations, and ``$NAME``/``${NAME}`` expansions looked up in ``scope``
    and in earlier assignments. Anything that would make the shell *run* something
    (a command word, ``$(...)``, backquotes, redirections, pipes) is refused.

    :raises ParseError: the text is not in that subset (names the line).
    """
    lexer = _Lexer(text)
    variables: dict[str, str] = dict(scope or {})
    assigned: dict[str, str] = {}
    while lexer.pos < len(text):
        _parse_command(lexer, variables, assigned)
    return assigned


def _parse_command(lexer: _Lexer, variables: dict[str, str], assigned: dict[str, str]) -> None:
    """One simple command: up to an unquoted newline or ``;`` (consumed)."""
    first = True
    exporting = False
    while True:
        while lexer.peek() in _BLANKS and lexer.peek():
            lexer.take()
        char = lexer.peek()
        if char == "":
            return
        if char in "\n;":
            lexer.take()
            return
        if char == "#":
            while lexer.peek() not in ("", "\n"):
                lexer.take()
            continue
        if char == "\\" and lexer.peek(1) == "\n":
            lexer.take()
            lexer.take()
            continue
        start_line = lexer.line
        match = _NAME_RE.match(lexer.text, lexer.pos)
        if match is not None and lexer.peek(match.end() - lexer.pos) == "=":
            name = match.group()
            for _ in range(match.end() - lexer.pos + 1):
                lexer.take()
            value = _parse_word(lexer, variables)
            variables[name] = value
            assigned[name] = value
        else:
            word = _parse_word(lexer, variables)
            if first and word == "export" and match is not None and match.group() == "export":
                exporting = True
            elif exporting and _NAME_RE.fullmatch(word):
                pass  # `export NAME`: marks a variable for export; sets nothing
            else:
                shown = word if len(word) <= 40 else word[:40] + "..."
                raise ParseError(
                    f"line {start_line}: {shown!r} is not a variable assignment "
                    "(only NAME=VALUE, export and comments are read, nothing is run)"
                )
        first = False


def _parse_word(lexer: _Lexer, variables: Mapping[str, str]) -> str:
    """One shell word (assignment value or plain word) with quotes removed."""
    out: list[str] = []
    while True:
        char = lexer.peek()
        if char == "" or char in _BLANKS or char in "\n;":
            return "".join(out)
        if char in _OPERATORS:
            raise lexer.error(f"unsupported shell syntax {char!r} (nothing is run)")
        if char == "`":
            raise lexer.error("command substitution is not supported (nothing is run)")
        lexer.take()
        if char == "'":
            while True:
                if lexer.peek() == "":
                    raise lexer.error("unterminated single quote")
                inner = lexer.take()
                if inner == "'":
                    break
                out.append(inner)
        elif char == '"':
            out.append(_parse_double_quoted(lexer, variables))
        elif char == "\\":
            nxt = lexer.peek()
            if nxt == "":
                out.append("\\")
            elif nxt == "\n":
                lexer.take()
            else:
                out.append(lexer.take())
        elif char == "$":
            out.append(_parse_expansion(lexer, variables))
        else:
            out.append(char)


def _parse_double_quoted(lexer: _Lexer, variables: Mapping[str, str]) -> str:
    out: list[str] = []
    while True:
        char = lexer.peek()
        if char == "":
            raise lexer.error("unterminated double quote")
        lexer.take()
        if char == '"':
            return "".join(out)
        if char == "\\":
            nxt = lexer.peek()
            if nxt == "\n":
                lexer.take()
            elif nxt != "" and nxt in _DQ_ESCAPES:
                out.append(lexer.take())
            else:
                out.append("\\")
        elif char == "`":
            raise lexer.error("command substitution is not supported (nothing is run)")
        elif char == "$":
            out.append(_parse_expansion(lexer, variables))
        else:
            out.append(char)


def _parse_expansion(lexer: _Lexer, variables: Mapping[str, str]) -> str:
    """After a ``$``: ``NAME``, ``{NAME}`` or a literal dollar sign."""
    char = lexer.peek()
    if char == "(":
        raise lexer.error("command substitution is not supported (nothing is run)")
    if char == "{":
        end = lexer.text.find("}", lexer.pos)
        inner = lexer.text[lexer.pos + 1 : end] if end >= 0 else ""
        if end < 0 or not _NAME_RE.fullmatch(inner):
            raise lexer.error("only ${NAME} expansions are supported")
        for _ in range(end - lexer.pos + 1):
            lexer.take()
        return variables.get(inner, "")
    match = _NAME_RE.match(lexer.text, lexer.pos)
    if match is not None:
        for _ in range(match.end() - lexer.pos):
            lexer.take()
        return variables.get(match.group(), "")
    if char != "" and (char.isdigit() or char in "@*#?-$!"):
        raise lexer.error(f"special parameter ${char} is not supported")
    return "$"


# --------------------------------------------------------------------------------------
# Rendering.


def _echo_unquoted(value: str) -> str:
    """What ``$(eval echo "\\$NAME")`` yields: the value's blank runs collapsed."""
    return " ".join(value.split())


def _dq_escape(value: str) -> str:
    """Escape what would end or act inside a double-quoted sh string."""
    return re.sub(r'(["\\$`])', r"\\\1", value)


def docker_opt_variables(env: Mapping[str, str], *, no_masq: bool) -> dict[str, str]:
    """Steps 2–4 and 6 of the script: the ``DOCKER_OPT_*`` variables, in ``set`` order.

    :raises ConfigError: ``FLANNEL_IPMASQ`` is neither ``true`` nor ``false``.
    """
    variables = {name: value for name, value in env.items() if "DOCKER_OPT_" in name}
    subnet = env.get("FLANNEL_SUBNET", "")
    if subnet:
        variables["DOCKER_OPT_BIP"] = f"--bip={subnet}"
    mtu = env.get("FLANNEL_MTU", "")
    if mtu:
        variables["DOCKER_OPT_MTU"] = f"--mtu={mtu}"
    ipmasq = env.get("FLANNEL_IPMASQ", "")
    if ipmasq and not no_masq:
        if ipmasq == "true":
            variables["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
        elif ipmasq == "false":
            variables["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise ConfigError(f"Invalid value of FLANNEL_IPMASQ: {ipmasq}")
    # dash's `set` sorts by name, comparing byte values with '=' as the terminator.
    ordered = sorted(variables, key=lambda name: name.encode("utf-8", "surrogateescape"))
    return {name: variables[name] for name in ordered}


def render(
    env: Mapping[str, str],
    *,
    individual: bool,
    combined: bool,
    key: str,
    no_masq: bool,
    key_env_value: str,
) -> str:
    """The bytes the script writes to its ``-d`` file, as text.

    ``env`` holds every shell variable after sourcing (the process environment
    overlaid with the flannel file); ``key_env_value`` is the current value of the
    variable named by ``key`` (in the script that, too, may come from the file).
    ``individual``/``combined`` are taken literally here; the "neither means both"
    rule belongs to the command line (see :func:`main`).

    :raises ConfigError: invalid ``FLANNEL_IPMASQ`` (message as the script's).
    """
    combined_value = key_env_value + " " if key_env_value else ""
    lines: list[str] = []
    for name, raw in docker_opt_variables(env, no_masq=no_masq).items():
        value = _echo_unquoted(raw)
        if individual:
            lines.append(f'{name}="{_dq_escape(value)}"\n')
        combined_value += " " + value
    if combined:
        lines.append(f'{key}="{_dq_escape(combined_value)}"\n')
    return "".join(lines)


# --------------------------------------------------------------------------------------
# Step 8: the route-collision check.


def _cut_field(text: str, delim: str, fields: Sequence[int]) -> str:
    """``cut -d<delim> -f<fields>`` on one line (no delimiter: the whole line)."""
    if delim not in text:
        return text
    parts = text.split(delim)
    return delim.join(parts[i - 1] for i in fields if i <= len(parts))


def _sh_number(text: str, env: Mapping[str, str], *, name_ok: bool = True) -> int | None:
    """dash's reading of ``$((text - 1))``'s operand, or ``None`` if dash fails on it.

    Numbers are C literals (``010`` is octal, ``0x10`` hex); a variable name stands
    for its value, which must then be a number itself (empty or unset: 0).
    """
    if text == "":
        return 0
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    if name_ok and _NAME_RE.fullmatch(text):
        return _sh_number(env.get(text, "").strip(), env, name_ok=False)
    return None


def collision_pattern(flannel_subnet: str, env: Mapping[str, str]) -> str | None:
    """The ``<a.b.c.(d-1)>/<len>`` the script greps for, or ``None`` if dash would fail.

    Computed with the script's ``cut`` pipeline, so odd input gives the same odd pattern.
    """
    subnet = _echo_unquoted(flannel_subnet)
    dot_four = _cut_field(_cut_field(subnet, ".", [4]), "/", [1])
    number = _sh_number(dot_four, env)
    if number is None:
        return None
    pre = _cut_field(subnet, ".", [1, 2, 3])
    lat = _cut_field(subnet, "/", [2])
    return f"{pre}.{number - 1}/{lat}"


def route_collisions(pattern: str, route_table: str) -> str:
    """``ip route show | grep <pattern> | grep via`` (BRE ``.`` matches any character)."""
    if not pattern or pattern.startswith("-") or any(c in pattern for c in " \t\n"):
        return ""  # grep would take it as an option or as file names: no output
    regex = re.compile(".".join(re.escape(part) for part in pattern.split(".")))
    hits = [line for line in route_table.splitlines() if regex.search(line) and "via" in line]
    return "\n".join(hits)


def ip_route_show() -> str:
    """The output of ``ip route show`` (empty if ``ip`` is missing or hangs)."""
    try:
        done = subprocess.run(
            ["ip", "route", "show"],
            stdout=subprocess.PIPE,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------
# Files and the command.


def read_flannel_env(path: str, scope: Mapping[str, str]) -> dict[str, str] | None:
    """Variables set by sourcing ``path``, or ``None`` if it is not a regular file.

    :raises ParseError: the file is not in the sh assignment subset.
    :raises OSError: it exists but cannot be read.
    """
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8", "surrogateescape")
    return parse_sh_assignments(text, scope)


def write_atomic(path: str, content: str, mode: int = 0o644) -> None:
    """Replace ``path`` (through symlinks, like ``>``) with ``content`` in one rename."""
    data = content.encode("utf-8", "surrogateescape")
    replace_file(Path(os.path.realpath(path)), data, mode=mode, parents=False)


def main(
    argv: list[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    route_table: Callable[[], str] | None = None,
    prog: str = PROG,
) -> int:
    """Run ``mk-docker-opts`` and return its exit status (0, 1, or 2 for a bad file).

    ``environ`` (default ``os.environ``) and ``route_table`` (default: run
    ``ip route show``) exist so tests can pin what the script would see.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_options(args)
    except UsageError as exc:
        if str(exc):
            sys.stderr.write(f"{exc}\n")
        sys.stderr.write(USAGE.format(prog=prog))
        return 1
    individual, combined = opts.individual, opts.combined
    if not individual and not combined:
        individual = combined = True

    env = dict(os.environ if environ is None else environ)
    try:
        sourced = read_flannel_env(opts.flannel_env, env)
    except ParseError as exc:
        sys.stderr.write(f"{prog}: {opts.flannel_env}: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"{prog}: {opts.flannel_env}: {exc.strerror or exc}\n")
        return 2
    if sourced:
        env.update(sourced)

    try:
        content = render(
            env,
            individual=individual,
            combined=combined,
            key=opts.key,
            no_masq=opts.no_masq,
            key_env_value=env.get(opts.key, ""),
        )
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1

    try:
        write_atomic(opts.docker_env, content)
    except OSError as exc:
        sys.stderr.write(
            f"{prog}: cannot create {opts.docker_env}: {exc.strerror or exc}: "
            "check that its directory exists and is writable\n"
        )
        return 1

    subnet = env.get("FLANNEL_SUBNET", "")
    if subnet:
        pattern = collision_pattern(subnet, env)
        if pattern is None:
            sys.stderr.write(
                f"{prog}: arithmetic expression: cannot take the last octet of "
                f"FLANNEL_SUBNET={subnet!r}\n"
            )
            return 2
        hits = route_collisions(pattern, (route_table or ip_route_show)())
        if hits:
            sys.stderr.write(f"Your routing table already contains the subnet: {hits}\n")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
