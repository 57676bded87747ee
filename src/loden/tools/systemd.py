"""``loden systemd``: the files the seed guide's ``flannel.sh`` writes, and how systemd
reads them back.

The guide installs flannel with a script that writes three files (and then runs
``systemctl``): ``/opt/kubernetes/cfg/flanneld`` with ``FLANNEL_OPTIONS="..."``, a
``flanneld.service`` that runs ``flanneld --ip-masq $FLANNEL_OPTIONS`` and then
``mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/subnet.env``, and a
``docker.service`` that runs ``dockerd $DOCKER_NETWORK_OPTIONS`` with the rewritten
subnet.env as its ``EnvironmentFile``. ``render`` writes the same bytes (the heredocs'
``\\``-newline continuations already joined, as bash does) plus two tiny ``/bin/sh``
wrappers at the guide's binary paths that exec Loden, so an operator following the
guide, or the lab reproducing it, gets Loden without editing anything.

The lab has no systemd (PID 1 is not systemd on the test machines), so this module also
implements the two pieces of systemd that give those files their meaning:
:func:`parse_environment_file` (systemd's env-file state machine: quotes, escapes,
comments, trailing-blank trimming) and :func:`exec_argv` (``ExecStart=`` word splitting
and unquoting, ``$VAR`` as a whole word split into several arguments, ``${VAR}`` kept as
one, ``$$``, ``%%``). :func:`unit_exec_argv` combines them to produce the exact argv
systemd would start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loden.errors import ConfigError, ParseError
from loden.files import replace_file

SEED_CAFILE = "/opt/etcd/ssl/ca.pem"
SEED_CERTFILE = "/opt/etcd/ssl/server.pem"
SEED_KEYFILE = "/opt/etcd/ssl/server-key.pem"
SEED_BIN_DIR = "/opt/kubernetes/bin"
SEED_CFG_DIR = "/opt/kubernetes/cfg"
UNIT_DIR = "/usr/lib/systemd/system"
SUBNET_FILE = "/run/flannel/subnet.env"


def default_loden() -> str:
    """``<venv>/bin/loden`` of the running interpreter (the wrappers exec it)."""
    return os.path.join(sys.prefix, "bin", "loden")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What ``flannel.sh`` is parameterised by (its ``$1``), plus Loden's additions.

    An empty TLS path leaves that flag out of ``FLANNEL_OPTIONS`` (for a plain-HTTP
    etcd); the defaults are the guide's paths.
    """

    etcd_endpoints: str
    etcd_cafile: str = SEED_CAFILE
    etcd_certfile: str = SEED_CERTFILE
    etcd_keyfile: str = SEED_KEYFILE
    bin_dir: str = SEED_BIN_DIR
    cfg_dir: str = SEED_CFG_DIR
    unit_dir: str = UNIT_DIR
    extra_options: str = ""
    loden: str = field(default_factory=default_loden)


def _check_value(name: str, value: str, *, spaces: bool = False) -> None:
    bad = '"\\\n\r' if spaces else '"\\\n\r \t'
    if any(char in bad for char in value):
        what = "quotes, backslashes or line breaks" if spaces else "blanks, quotes or backslashes"
        raise ConfigError(f"{name} {value!r} must not contain {what}: it goes into a unit file")


def _check_path(name: str, value: str) -> None:
    _check_value(name, value)
    if not value.startswith("/") or "%" in value or "$" in value:
        raise ConfigError(f"{name} {value!r} must be an absolute path without '%' or '$'")


def flannel_options(opts: RenderOptions) -> str:
    """The value of ``FLANNEL_OPTIONS`` (the guide's flag spelling: one ``--``, then ``-``)."""
    parts = [f"--etcd-endpoints={opts.etcd_endpoints}"]
    for flag, value in (
        ("-etcd-cafile", opts.etcd_cafile),
        ("-etcd-certfile", opts.etcd_certfile),
        ("-etcd-keyfile", opts.etcd_keyfile),
    ):
        if value:
            parts.append(f"{flag}={value}")
    if opts.extra_options.strip():
        parts.append(" ".join(opts.extra_options.split()))
    return " ".join(parts)


def render_files(opts: RenderOptions) -> dict[str, str]:
    """Every file ``render`` writes: absolute path on the target system → content.

    :raises ConfigError: a value would break the file it goes into.
    """
    _check_value("--etcd-endpoints", opts.etcd_endpoints)
    if not opts.etcd_endpoints:
        raise ConfigError("--etcd-endpoints must name at least one etcd URL")
    for name, value in (
        ("--etcd-cafile", opts.etcd_cafile),
        ("--etcd-certfile", opts.etcd_certfile),
        ("--etcd-keyfile", opts.etcd_keyfile),
    ):
        _check_value(name, value)
    for name, value in (
        ("--bin-dir", opts.bin_dir),
        ("--cfg-dir", opts.cfg_dir),
        ("--unit-dir", opts.unit_dir),
        ("--loden", opts.loden),
    ):
        _check_path(name, value)
    _check_value("--extra-options", opts.extra_options, spaces=True)

    bin_dir = opts.bin_dir.rstrip("/") or "/"
    cfg_file = os.path.join(opts.cfg_dir, "flanneld")
    flanneld = os.path.join(bin_dir, "flanneld")
    mk_docker_opts = os.path.join(bin_dir, "mk-docker-opts.sh")
    env_file = f'\nFLANNEL_OPTIONS="{flannel_options(opts)}"\n\n'
    flanneld_unit = (
        "[Unit]\n"
        "Description=Flanneld overlay address etcd agent\n"
        "After=network-online.target network.target\n"
        "Before=docker.service\n"
        "\n"
        "[Service]\n"
        "Type=notify\n"
        f"EnvironmentFile={cfg_file}\n"
        f"ExecStart={flanneld} --ip-masq $FLANNEL_OPTIONS\n"
        f"ExecStartPost={mk_docker_opts} -k DOCKER_NETWORK_OPTIONS -d {SUBNET_FILE}\n"
        "Restart=on-failure\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
        "\n"
    )
    docker_unit = (
        "\n"
        "[Unit]\n"
        "Description=Docker Application Container Engine\n"
        "Documentation=https://docs.docker.com\n"
        "After=network-online.target firewalld.service\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=notify\n"
        f"EnvironmentFile={SUBNET_FILE}\n"
        "ExecStart=/usr/bin/dockerd $DOCKER_NETWORK_OPTIONS\n"
        "ExecReload=/bin/kill -s HUP $MAINPID\n"
        "LimitNOFILE=infinity\n"
        "LimitNPROC=infinity\n"
        "LimitCORE=infinity\n"
        "TimeoutStartSec=0\n"
        "Delegate=yes\n"
        "KillMode=process\n"
        "Restart=on-failure\n"
        "StartLimitBurst=3\n"
        "StartLimitInterval=60s\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
        "\n"
    )
    return {
        cfg_file: env_file,
        os.path.join(opts.unit_dir, "flanneld.service"): flanneld_unit,
        os.path.join(opts.unit_dir, "docker.service"): docker_unit,
        flanneld: f'#!/bin/sh\nexec {opts.loden} agent "$@"\n',
        mk_docker_opts: f'#!/bin/sh\nexec {opts.loden} mk-docker-opts "$@"\n',
    }


def file_modes(opts: RenderOptions) -> dict[str, int]:
    """The mode of each rendered file: the wrappers are executable, the rest 0644."""
    bin_dir = opts.bin_dir.rstrip("/") or "/"
    wrappers = {os.path.join(bin_dir, "flanneld"), os.path.join(bin_dir, "mk-docker-opts.sh")}
    return {path: 0o755 if path in wrappers else 0o644 for path in render_files(opts)}


def under_root(root: Path, path: str) -> Path:
    """``path`` (absolute on the target) inside ``root``."""
    return root / path.lstrip("/")


def write_files(root: Path, opts: RenderOptions) -> list[Path]:
    """Write every rendered file under ``root`` (atomically, with its mode).

    :raises ConfigError: a value is unusable.
    :raises OSError: a file cannot be written.
    """
    modes = file_modes(opts)
    written: list[Path] = []
    for path, content in render_files(opts).items():
        target = under_root(root, path)
        replace_file(target, content.encode("utf-8"), mode=modes[path])
        written.append(target)
    return written


# --------------------------------------------------------------------------------------
# systemd's EnvironmentFile= format.

_NEWLINE = "\n\r"
_WHITESPACE = " \t\n\r"
_COMMENTS = "#;"
_SHELL_NEED_ESCAPE = '"\\`$'


def env_name_is_valid(name: str) -> bool:
    """systemd's ``env_name_is_valid``: ``[A-Za-z_][A-Za-z0-9_]*``."""
    return (
        bool(name)
        and (name[0].isascii() and (name[0].isalpha() or name[0] == "_"))
        and all(char.isascii() and (char.isalnum() or char == "_") for char in name)
    )


def parse_environment_file(text: str) -> dict[str, str]:
    """Read an ``EnvironmentFile=`` the way systemd's ``parse_env_file`` does.

    ``KEY=VALUE`` per line; blank lines and ``#``/``;`` comment lines are skipped;
    blanks around the key and before the value are dropped; an unquoted value keeps
    inner blanks, loses trailing ones, and treats ``\\`` as an escape (``\\``-newline
    continues the line); ``'...'`` is literal; ``"..."`` honours ``\\"``, ``\\\\``,
    ``\\```, ``\\$`` and ``\\``-newline; quoted and unquoted parts concatenate. A line
    whose key is not a valid variable name (``export FOO=...`` included) is ignored,
    as systemd ignores it with a warning. Never raises.
    """
    values: dict[str, str] = {}
    state = "pre_key"
    key: list[str] = []
    value: list[str] = []
    value_trim = 0  # length of `value` without its trailing unquoted blanks

    def push() -> None:
        name = "".join(key).rstrip(_WHITESPACE)
        if env_name_is_valid(name):
            values[name] = "".join(value[:value_trim])

    for char in text:
        if state == "pre_key":
            if char in _COMMENTS:
                state = "comment"
            elif char not in _WHITESPACE:
                state = "key"
                key = [char]
        elif state == "key":
            if char in _NEWLINE:
                state = "pre_key"
            elif char == "=":
                state = "pre_value"
                value = []
                value_trim = 0
            else:
                key.append(char)
        elif state == "pre_value":
            if char in _NEWLINE:
                push()
                state = "pre_key"
            elif char == "'":
                state = "single"
            elif char == '"':
                state = "double"
            elif char == "\\":
                state = "value_escape"
            elif char not in _WHITESPACE:
                state = "value"
                value.append(char)
                value_trim = len(value)
        elif state == "value":
            if char in _NEWLINE:
                push()
                state = "pre_key"
            elif char == "\\":
                state = "value_escape"
            else:
                value.append(char)
                if char not in _WHITESPACE:
                    value_trim = len(value)
        elif state == "value_escape":
            state = "value"
            if char not in _NEWLINE:
                value.append(char)
                value_trim = len(value)
        elif state == "single":
            if char == "'":
                state = "pre_value"
            else:
                value.append(char)
                value_trim = len(value)
        elif state == "double":
            if char == '"':
                state = "pre_value"
            elif char == "\\":
                state = "double_escape"
            else:
                value.append(char)
                value_trim = len(value)
        elif state == "double_escape":
            state = "double"
            if char in _SHELL_NEED_ESCAPE:
                value.append(char)
            elif char not in _NEWLINE:
                value += ["\\", char]
            value_trim = len(value)
        elif state == "comment" and char in _NEWLINE:
            state = "pre_key"
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push()
    return values


# --------------------------------------------------------------------------------------
# ExecStart= command lines.

_C_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}


def _cunescape_one(text: str, pos: int) -> tuple[str, int]:
    """Decode the C escape whose letter is at ``text[pos]``; returns (char, next pos)."""
    letter = text[pos] if pos < len(text) else ""
    if letter in _C_ESCAPES and letter:
        return _C_ESCAPES[letter], pos + 1
    for prefix, width, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if letter == prefix:
            digits = text[pos + 1 : pos + 1 + width]
            if len(digits) == width and all(c in "0123456789abcdefABCDEF" for c in digits):
                code = int(digits, base)
                if code <= 0x10FFFF and code != 0:
                    return chr(code), pos + 1 + width
            raise ParseError(f"invalid escape \\{text[pos : pos + 1 + width]} in {text!r}")
    digits = text[pos : pos + 3]
    if len(digits) == 3 and all(c in "01234567" for c in digits) and int(digits, 8) != 0:
        return chr(int(digits, 8)), pos + 3
    raise ParseError(f"invalid escape \\{letter} in {text!r}")


def split_exec_words(value: str, *, cunescape: bool = True, relax: bool = False) -> list[str]:
    """Split a command line into words like systemd's ``extract_first_word``.

    Quotes are removed and may start mid-word (``a"b c"d`` is one word ``ab cd``).
    With ``cunescape`` (command lines) a backslash starts a C escape (``\\n``,
    ``\\x41``, ``\\s``...); without it (variable values) it just quotes the next
    character. ``relax`` accepts an unterminated quote or a trailing backslash.

    :raises ParseError: an unterminated quote or an invalid escape.
    """
    words: list[str] = []
    pos = 0
    while True:
        while pos < len(value) and value[pos] in _WHITESPACE:
            pos += 1
        if pos >= len(value):
            return words
        word: list[str] = []
        quote = ""
        while pos < len(value):
            char = value[pos]
            if not quote and char in _WHITESPACE:
                break
            pos += 1
            if char == "\\":
                if pos >= len(value):
                    if not relax:
                        raise ParseError(f"trailing backslash in {value!r}")
                    word.append(char)
                elif cunescape:
                    decoded, pos = _cunescape_one(value, pos)
                    word.append(decoded)
                else:
                    word.append(value[pos])
                    pos += 1
            elif quote and char == quote:
                quote = ""
            elif not quote and char in "'\"":
                quote = char
            else:
                word.append(char)
        if quote and not relax:
            raise ParseError(f"unterminated {quote} quote in {value!r}")
        words.append("".join(word))


def _replace_env(word: str, env: Mapping[str, str]) -> str:
    """``${NAME}`` anywhere in ``word`` → its value; ``$$`` → ``$``; other ``$`` literal."""
    out: list[str] = []
    pos = 0
    while pos < len(word):
        char = word[pos]
        if char == "$" and word[pos + 1 : pos + 2] == "{":
            end = word.find("}", pos + 2)
            if end < 0:
                raise ParseError(f"unterminated ${{ in {word!r}")
            out.append(env.get(word[pos + 2 : end], ""))
            pos = end + 1
        elif char == "$" and word[pos + 1 : pos + 2] == "$":
            out.append("$")
            pos += 2
        else:
            out.append(char)
            pos += 1
    return "".join(out)


def _replace_specifiers(value: str) -> str:
    if "%" not in value:
        return value
    out: list[str] = []
    pos = 0
    while pos < len(value):
        if value[pos] == "%":
            if value[pos + 1 : pos + 2] != "%":
                raise ParseError(f"unit specifier %{value[pos + 1 : pos + 2]} is not supported")
            out.append("%")
            pos += 2
        else:
            out.append(value[pos])
            pos += 1
    return "".join(out)


def exec_argv(line: str, env: Mapping[str, str]) -> list[str]:
    """The argv systemd would execute for an ``ExecStart=`` line (or its value).

    Prefixes ``-@:+!`` are removed (``:`` also turns expansion off; with ``@`` the
    executable's path is kept as argv[0]). A word that is exactly ``$NAME`` becomes the
    variable's value split at blanks, honouring quotes (zero words if unset); ``${NAME}``
    is replaced in place and never split. Only the first command of a ``;``-separated
    list is returned.

    :raises ParseError: the line does not parse.
    """
    key = re.match(r"[A-Za-z][A-Za-z0-9]*[ \t]*=", line)
    value = line[key.end() :] if key else line
    value = _replace_specifiers(value.strip())
    expand = True
    separate_argv0 = False
    while value and value[0] in "-@:+!":
        if value[0] == ":":
            expand = False
        if value[0] == "@":
            separate_argv0 = True
        value = value[1:]
    words = split_exec_words(value)
    if ";" in words:
        words = words[: words.index(";")]
    if not words:
        raise ParseError(f"empty command line in {line!r}")
    if separate_argv0 and len(words) >= 2:
        words = [words[0], *words[2:]]
    if not expand:
        return words
    argv: list[str] = []
    for word in words:
        if word.startswith("$") and word[1:2] not in ("{", "$"):
            name = word[1:]
            if env_name_is_valid(name) and name in env:
                argv += split_exec_words(env[name], cunescape=False, relax=True)
            continue
        argv.append(_replace_env(word, env))
    return argv


# --------------------------------------------------------------------------------------
# Unit files.


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's ``[Section]`` → ``(Key, value)`` pairs, in order.

    Comment lines (``#``/``;``) and blank lines are skipped; a line ending in ``\\``
    continues on the next one (the backslash becomes a blank, as in systemd).
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        pending = ""
        if line.endswith("\\") and not line.lstrip().startswith(("#", ";")):
            pending = line[:-1] + " "
            continue
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], [])
            continue
        if current is None or "=" not in stripped:
            continue
        key, _, value = stripped.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_environment(
    unit_text: str, *, root: Path | None = None, base_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment systemd gives the unit's commands.

    ``base_env`` (the manager's own, default empty), then ``Environment=``, then each
    ``EnvironmentFile=`` in order (read under ``root``; a ``-`` prefix ignores a missing
    file, as in systemd).

    :raises ConfigError: a required environment file is missing.
    """
    env = dict(base_env or {})
    service = parse_unit(unit_text).get("Service", [])
    for key, value in service:
        if key == "Environment":
            for assignment in split_exec_words(value):
                name, sep, item = assignment.partition("=")
                if sep and env_name_is_valid(name):
                    env[name] = item
    for key, value in service:
        if key != "EnvironmentFile" or not value:
            continue
        optional = value.startswith("-")
        path = value[1:] if optional else value
        target = under_root(root, path) if root is not None else Path(path)
        try:
            env.update(parse_environment_file(target.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            if not optional:
                raise ConfigError(
                    f"EnvironmentFile {path} does not exist (looked at {target}); "
                    "write it first or prefix it with '-'"
                ) from exc
    return env


def unit_exec_argv(
    unit_text: str,
    *,
    key: str = "ExecStart",
    root: Path | None = None,
    base_env: Mapping[str, str] | None = None,
) -> list[str]:
    """The argv systemd would start for ``key`` (the first one) of a service unit.

    :raises ConfigError: the unit has no such command, or an env file is missing.
    :raises ParseError: the command line does not parse.
    """
    commands = [value for name, value in parse_unit(unit_text).get("Service", []) if name == key]
    commands = [value for value in commands if value]
    if not commands:
        raise ConfigError(f"the unit has no {key}= line in its [Service] section")
    return exec_argv(commands[0], unit_environment(unit_text, root=root, base_env=base_env))


# --------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loden systemd",
        description="Write the seed guide's flanneld/docker units, or show a unit's argv.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="write flannel.sh's files (and exec wrappers)")
    render.add_argument("--root", required=True, type=Path, help="write under this directory")
    render.add_argument("--etcd-endpoints", required=True, help="comma-separated etcd URLs")
    render.add_argument("--etcd-cafile", default=SEED_CAFILE, help="'' leaves the flag out")
    render.add_argument("--etcd-certfile", default=SEED_CERTFILE, help="'' leaves it out")
    render.add_argument("--etcd-keyfile", default=SEED_KEYFILE, help="'' leaves it out")
    render.add_argument("--bin-dir", default=SEED_BIN_DIR)
    render.add_argument("--cfg-dir", default=SEED_CFG_DIR)
    render.add_argument("--unit-dir", default=UNIT_DIR)
    render.add_argument(
        "--extra-options",
        default="",
        help="more agent flags appended to FLANNEL_OPTIONS (write --extra-options='-v=2')",
    )
    render.add_argument("--loden", default=default_loden(), help="loden executable to exec")
    show = sub.add_parser("argv", help="print the argv systemd would run, as JSON")
    show.add_argument("unit", help="unit file path on the target, e.g. " + UNIT_DIR + "/x")
    show.add_argument("--root", type=Path, default=Path("/"))
    show.add_argument("--key", default="ExecStart")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``loden systemd render|argv ...``; returns the exit status (2 for usage errors)."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "render":
            opts = RenderOptions(
                etcd_endpoints=args.etcd_endpoints,
                etcd_cafile=args.etcd_cafile,
                etcd_certfile=args.etcd_certfile,
                etcd_keyfile=args.etcd_keyfile,
                bin_dir=args.bin_dir,
                cfg_dir=args.cfg_dir,
                unit_dir=args.unit_dir,
                extra_options=args.extra_options,
                loden=args.loden,
            )
            for path in write_files(args.root, opts):
                sys.stdout.write(f"{path}\n")
            return 0
        unit = under_root(args.root, args.unit).read_text(encoding="utf-8")
        sys.stdout.write(json.dumps(unit_exec_argv(unit, key=args.key, root=args.root)) + "\n")
        return 0
    except (ConfigError, ParseError) as exc:
        sys.stderr.write(f"loden systemd: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(
            f"loden systemd: {exc.filename or ''}: {exc.strerror or exc}: "
            "check the --root directory\n"
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
