"""How systemd reads the files ``loden systemd render`` writes (``loden systemd argv``).

The lab has no systemd (PID 1 is not systemd on the test machines), so this module
also stands in for it there. It implements the pieces of systemd that give those files
their meaning: :func:`parse_environment_file` (systemd's env-file state machine: quotes, escapes,
comments, trailing-blank trimming) and :func:`exec_argv` (``ExecStart=`` word splitting
and unquoting, ``$VAR`` as a whole word split into several arguments, ``${VAR}`` kept as
one, ``$$``, ``%%``). :func:`unit_exec_argv` combines them to produce the exact argv
systemd would start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from loden.errors import ConfigError, ParseError


def under_root(root: Path, path: str) -> Path:
    """``path`` (absolute on the target) inside ``root``."""
    return root / path.lstrip("/")


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
