"""The ``flannel`` CNI plugin process: environment in, JSON out, delegate in between.

A runtime (kubelet via containerd/CRI-O, or anything following the CNI spec) runs this
with ``CNI_COMMAND`` and friends in the environment and the network config on stdin.
The request is checked in the same order as the Go CNI library's ``skel`` does for
flannel, so the same bad input yields the same error code and message:

1. required ``CNI_*`` variables (code 4; no ``CNI_COMMAND`` at all prints an "about"
   text to stderr and exits 0, as Go plugins do);
2. unless VERSION: stdin is a JSON object (6) with a valid ``name`` (7), the container
   ID (3/4) and the interface name (4) are valid (not checked for GC and STATUS), the
   command is known (4), the config's ``cniVersion`` is one we support (1) and the
   netconf's known fields have the right JSON types (7);
3. ADD loads ``subnet.env`` (missing file: 11 "try again later", since the agent has not
   written it yet), renders the delegate config (:mod:`loden.cni.netconf`), saves it
   atomically to ``<dataDir>/<containerID>`` and runs the delegate plugin found on
   ``CNI_PATH`` with the same environment; the delegate's stdout is our result and its
   error reply is passed through unchanged;
4. DEL runs the delegate's DEL with the saved config and then removes the file.
   A missing file is success (nothing to undo); an unparseable one is success with a
   message on stderr (and the file is removed, flannel leaves it); when the delegate's
   DEL fails the file is kept so that the runtime's retry can try again (flannel's Go
   code removes it regardless, because its deferred cleanup sees a stale ``err``);
5. CHECK and GC succeed without doing anything, as in flannel; STATUS (spec 1.1, which
   flannel's plugin predates) succeeds when ``subnet.env`` is present and valid and
   otherwise answers 50 "plugin not available".

Errors are one CNI error object on stdout and exit status 1. Where flannel's Go code
returns a plain error (which the library reports as 999) we give the spec's specific
code instead: 7 for a bad netconf or delegate section (messages unchanged), 11 for a
missing ``subnet.env``, 5 for other I/O failures; a broken ``subnet.env`` and a delegate
that cannot be found or run stay 999.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from loden import __version__
from loden.cni.delegate import build_delegate
from loden.cni.netconf import (
    FlannelNetConf,
    config_name,
    config_version,
    decode_object,
    marshal,
    parse_netconf,
)
from loden.cni.subnet_env import FlannelSubnetEnv, parse_subnet_env
from loden.cni.types import (
    CURRENT_VERSION,
    ERR_DECODING_FAILURE,
    ERR_INCOMPATIBLE_CNI_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_ENVIRONMENT_VARIABLES,
    ERR_INVALID_NETWORK_CONFIG,
    ERR_IO_FAILURE,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
    SUPPORTED_VERSIONS,
    CniFailure,
    version_at_least,
    version_reply,
)
from loden.errors import ParseError
from loden.files import replace_file

ABOUT = (
    f"CNI Plugin flannel version loden-{__version__} "
    f"({platform.system().lower()}/{platform.machine()})"
)

# Which CNI_* variables each command requires (the CNI library's table, in its order).
_ENV_VARS: tuple[tuple[str, frozenset[str]], ...] = (
    ("CNI_COMMAND", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_CONTAINERID", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_NETNS", frozenset({"ADD", "CHECK"})),
    ("CNI_IFNAME", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_ARGS", frozenset()),
    ("CNI_PATH", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_NETNS_OVERRIDE", frozenset()),
)
_KNOWN_COMMANDS = ("ADD", "CHECK", "DEL", "GC", "STATUS", "VERSION")
# Commands about the network as a whole: no container ID or interface to validate.
_NETWORK_COMMANDS = ("GC", "STATUS")
_VALID_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_IFNAMSIZ = 16


@dataclass(frozen=True, slots=True)
class Request:
    """A validated invocation: the environment's values plus the decoded config."""

    command: str
    container_id: str
    netns: str
    ifname: str
    path: str
    stdin: bytes
    netconf: FlannelNetConf | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the process prints on stdout and its exit status."""

    exit_code: int
    stdout: bytes = b""


def reply_version(stdin: bytes) -> str:
    """The ``cniVersion`` to put in an error reply: the config's if it has one, else ours."""
    try:
        version = decode_object(stdin, "types.NetConf").field("cniVersion")
    except ParseError:
        return CURRENT_VERSION
    return version if isinstance(version, str) and version else CURRENT_VERSION


def _subnet_env_error(detail: str) -> str:
    return (
        f"failed to load flannel 'subnet.env' file: {detail}. "
        "Check the flannel pod log for this node."
    )


def _go_errno_text(exc: OSError) -> str:
    """``no such file or directory``: Go's lower-case spelling of an errno."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _check_ifname(ifname: str) -> CniFailure | None:
    if not ifname:
        return CniFailure(ERR_INVALID_ENVIRONMENT_VARIABLES, "interface name is empty")
    if len(ifname.encode("utf-8", "surrogateescape")) > _IFNAMSIZ - 1:
        return CniFailure(
            ERR_INVALID_ENVIRONMENT_VARIABLES,
            "interface name is too long",
            f"interface name should be less than {_IFNAMSIZ} characters",
        )
    if ifname in (".", ".."):
        return CniFailure(ERR_INVALID_ENVIRONMENT_VARIABLES, "interface name is . or ..")
    if any(char in "/:" or char.isspace() for char in ifname):
        return CniFailure(
            ERR_INVALID_ENVIRONMENT_VARIABLES,
            "interface name contains / or : or whitespace characters",
        )
    return None


def _check_version(command: str, stdin: bytes) -> CniFailure | None:
    """The CNI library's version gate for ``command`` (ADD/DEL/CHECK/GC)."""
    try:
        version = config_version(stdin)
        minimum = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}.get(command)
        if minimum is not None:
            if not version_at_least(version, minimum):
                return CniFailure(
                    ERR_INCOMPATIBLE_CNI_VERSION, f"config version does not allow {command}"
                )
            if not any(version_at_least(ours, version) for ours in SUPPORTED_VERSIONS):
                return CniFailure(
                    ERR_INCOMPATIBLE_CNI_VERSION, f"plugin version does not allow {command}"
                )
    except ParseError as exc:
        return CniFailure(ERR_DECODING_FAILURE, str(exc))
    if version not in SUPPORTED_VERSIONS:
        supported = " ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
        return CniFailure(
            ERR_INCOMPATIBLE_CNI_VERSION,
            "incompatible CNI versions",
            f'config is "{version}", plugin supports [{supported}]',
        )
    return None


def decode_request(
    environ: Mapping[str, str], read_stdin: Callable[[], bytes]
) -> Request | CniFailure | None:
    """Validate the environment and stdin; no file or process is touched.

    Returns ``None`` when ``CNI_COMMAND`` is unset (print :data:`ABOUT`, exit 0), a
    :class:`CniFailure` for any invalid input, else the :class:`Request`. Never raises
    for any ``environ`` or stdin bytes.
    """
    command = environ.get("CNI_COMMAND", "")
    missing = [
        name
        for name, needed_by in _ENV_VARS
        if not environ.get(name, "") and (command in needed_by or name == "CNI_COMMAND")
    ]
    if missing:
        if not command:
            return None
        return CniFailure(
            ERR_INVALID_ENVIRONMENT_VARIABLES,
            f"required env variables [{','.join(missing)}] missing",
        )
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    try:
        stdin = b"" if command == "VERSION" else read_stdin()
    except OSError as exc:
        return CniFailure(ERR_IO_FAILURE, f"error reading from stdin: {_go_errno_text(exc)}")
    request = Request(
        command=command,
        container_id=container_id,
        netns=environ.get("CNI_NETNS", ""),
        ifname=ifname,
        path=environ.get("CNI_PATH", ""),
        stdin=stdin,
    )
    if command == "VERSION":
        return request
    try:
        name = config_name(stdin)
    except ParseError as exc:
        return CniFailure(ERR_DECODING_FAILURE, f"error unmarshall network config: {exc}")
    if not name:
        return CniFailure(ERR_INVALID_NETWORK_CONFIG, "missing network name")
    if not _VALID_NAME.fullmatch(name):
        return CniFailure(
            ERR_INVALID_NETWORK_CONFIG, "invalid characters found in network name", name
        )
    if command not in _NETWORK_COMMANDS:
        if not container_id:
            return CniFailure(ERR_UNKNOWN_CONTAINER, "missing containerID")
        if not _VALID_NAME.fullmatch(container_id):
            return CniFailure(
                ERR_INVALID_ENVIRONMENT_VARIABLES,
                "invalid characters in containerID",
                container_id,
            )
        bad_ifname = _check_ifname(ifname)
        if bad_ifname is not None:
            return bad_ifname
    if command not in _KNOWN_COMMANDS:
        return CniFailure(ERR_INVALID_ENVIRONMENT_VARIABLES, f"unknown CNI_COMMAND: {command}")
    bad_version = _check_version(command, stdin)
    if bad_version is not None:
        return bad_version
    if command not in ("ADD", "DEL", "STATUS"):
        return request
    try:
        netconf = parse_netconf(stdin)
    except ParseError as exc:
        return CniFailure(ERR_INVALID_NETWORK_CONFIG, f"failed to load netconf: {exc}")
    return Request(
        command=command,
        container_id=container_id,
        netns=request.netns,
        ifname=ifname,
        path=request.path,
        stdin=stdin,
        netconf=netconf,
    )


# --------------------------------------------------------------------------------------
# Files.


def save_delegate_config(data_dir: str, container_id: str, data: bytes) -> str:
    """Write ``data`` to ``<data_dir>/<container_id>`` atomically (dir 0700, file 0600).

    :raises OSError: the directory or file cannot be written.
    """
    path = os.path.join(data_dir, container_id)
    replace_file(Path(path), data, mode=0o600, dir_mode=0o700)
    return path


def _remove_quietly(path: str, stderr: TextIO) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        stderr.write(f"failed to remove {path}: {_go_errno_text(exc)}\n")


# --------------------------------------------------------------------------------------
# The delegate.


def find_plugin(plugin: str, cni_path: str) -> str | CniFailure:
    """The delegate's executable on ``CNI_PATH`` (the CNI library's ``FindInPath``)."""
    paths = [entry for entry in cni_path.split(os.pathsep) if entry]
    if not plugin:
        return CniFailure(ERR_INTERNAL, "no plugin name provided")
    if os.sep in plugin:
        return CniFailure(ERR_INTERNAL, f"invalid plugin name: {plugin}")
    if not paths:
        return CniFailure(ERR_INTERNAL, "no paths provided")
    for directory in paths:
        candidate = os.path.join(directory, plugin)
        if os.path.isfile(candidate):
            return candidate
    return CniFailure(ERR_INTERNAL, f'failed to find plugin "{plugin}" in path [{" ".join(paths)}]')


def _error_from_reply(stdout: bytes, stderr_text: str, returncode: int) -> CniFailure:
    """The delegate's own error reply, or a description when it printed none."""
    if not stdout.strip():
        if stderr_text:
            return CniFailure(ERR_INTERNAL, f"netplugin failed: {json.dumps(stderr_text)}")
        how = f"exit status {returncode}" if returncode > 0 else f"signal: {-returncode}"
        return CniFailure(ERR_INTERNAL, how)
    try:
        obj = decode_object(stdout, "types.Error")
    except ParseError as exc:
        text = stdout.decode("utf-8", "replace")
        return CniFailure(
            ERR_INTERNAL,
            f"netplugin failed but error parsing its diagnostic message {json.dumps(text)}: {exc}",
        )
    code, msg, details = (obj.field(name) for name in ("code", "msg", "details"))
    if isinstance(code, bool) or not isinstance(code, int) or code <= 0:
        code = ERR_INTERNAL  # a reply without a usable code still is an error
    return CniFailure(
        code,
        msg if isinstance(msg, str) else "",
        details if isinstance(details, str) else "",
    )


def invoke_delegate(
    plugin: str, command: str, config: bytes, environ: Mapping[str, str], stderr: TextIO
) -> bytes | CniFailure:
    """Run the delegate like the CNI library's ``invoke.Delegate*``.

    The delegate gets our environment with ``CNI_COMMAND`` replaced and ``config`` on
    stdin; its stderr is copied to ours. Returns its stdout on success.
    """
    executable = find_plugin(plugin, environ.get("CNI_PATH", ""))
    if isinstance(executable, CniFailure):
        return executable
    env = dict(environ)
    env["CNI_COMMAND"] = command
    try:
        done = subprocess.run([executable], input=config, env=env, capture_output=True, check=False)
    except OSError as exc:
        return CniFailure(ERR_INTERNAL, f"failed to run {executable}: {_go_errno_text(exc)}")
    stderr_text = done.stderr.decode("utf-8", "replace")
    if stderr_text:
        stderr.write(stderr_text if stderr_text.endswith("\n") else stderr_text + "\n")
    if done.returncode != 0:
        return _error_from_reply(done.stdout, stderr_text, done.returncode)
    return done.stdout


# --------------------------------------------------------------------------------------
# Commands.


def load_subnet_env(path: str) -> FlannelSubnetEnv | CniFailure:
    """Read and parse ``subnet.env``; a missing file is "try again later" (11)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError as exc:
        return CniFailure(
            ERR_TRY_AGAIN_LATER, _subnet_env_error(f"open {path}: {_go_errno_text(exc)}")
        )
    except OSError as exc:
        return CniFailure(ERR_IO_FAILURE, _subnet_env_error(f"read {path}: {_go_errno_text(exc)}"))
    try:
        return parse_subnet_env(text, path)
    except ParseError as exc:
        return CniFailure(ERR_INTERNAL, _subnet_env_error(str(exc)))


def cmd_add(request: Request, environ: Mapping[str, str], stderr: TextIO) -> Outcome | CniFailure:
    """ADD: subnet.env + netconf → delegate config → saved → delegate ADD."""
    conf = request.netconf
    assert conf is not None
    subnet_env = load_subnet_env(conf.subnet_file)
    if isinstance(subnet_env, CniFailure):
        return subnet_env
    try:
        delegate = build_delegate(conf, subnet_env)
        data = marshal(delegate)
    except ParseError as exc:
        return CniFailure(ERR_INVALID_NETWORK_CONFIG, str(exc))
    stderr.write("delegateAdd: netconf sent to delegate plugin:\n")
    stderr.write(data.decode("utf-8", "replace") + "\n")
    try:
        save_delegate_config(conf.data_dir, request.container_id, data)
    except OSError as exc:
        return CniFailure(
            ERR_IO_FAILURE,
            f"failed to save the delegate config in {conf.data_dir}: {_go_errno_text(exc)}",
        )
    plugin = delegate["type"]
    assert isinstance(plugin, str)
    result = invoke_delegate(plugin, "ADD", data, environ, stderr)
    if isinstance(result, CniFailure):
        return result
    try:
        decode_object(result, "types.Result")
    except ParseError as exc:
        return CniFailure(ERR_INTERNAL, f"failed to delegate add: {exc}")
    return Outcome(0, result)


def cmd_del(request: Request, environ: Mapping[str, str], stderr: TextIO) -> Outcome | CniFailure:
    """DEL: undo ADD with the saved delegate config; nothing saved is success."""
    conf = request.netconf
    assert conf is not None
    path = os.path.join(conf.data_dir, request.container_id)
    try:
        with open(path, "rb") as handle:
            saved = handle.read()
    except FileNotFoundError:
        return Outcome(0)
    except OSError as exc:
        return CniFailure(ERR_IO_FAILURE, f"read {path}: {_go_errno_text(exc)}")
    try:
        plugin = parse_netconf(saved).type
    except ParseError as exc:
        stderr.write(f"failed to parse netconf: {exc}\n")
        _remove_quietly(path, stderr)
        return Outcome(0)
    if not plugin:
        stderr.write(f"failed to parse netconf: {path} names no delegate 'type'\n")
        _remove_quietly(path, stderr)
        return Outcome(0)
    result = invoke_delegate(plugin, "DEL", saved, environ, stderr)
    if isinstance(result, CniFailure):
        return result
    _remove_quietly(path, stderr)
    return Outcome(0)


def cmd_status(request: Request) -> Outcome | CniFailure:
    """STATUS (spec 1.1): ready when ADD could work, i.e. subnet.env is there and valid.

    flannel's plugin predates STATUS; answering it keeps a runtime that asks (configs
    with ``cniVersion`` 1.1.0) from treating the network as ready before the agent
    has written ``subnet.env``.
    """
    conf = request.netconf
    assert conf is not None
    subnet_env = load_subnet_env(conf.subnet_file)
    if isinstance(subnet_env, CniFailure):
        return CniFailure(ERR_PLUGIN_NOT_AVAILABLE, subnet_env.msg)
    return Outcome(0)


def handle(environ: Mapping[str, str], read_stdin: Callable[[], bytes], stderr: TextIO) -> Outcome:
    """One plugin invocation, start to finish; never raises."""
    cache: list[bytes] = []

    def stdin_once() -> bytes:
        if not cache:
            cache.append(read_stdin())
        return cache[0]

    try:
        request = decode_request(environ, stdin_once)
        if request is None:
            stderr.write(ABOUT + "\n")
            stderr.write(f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")
            return Outcome(0)
        if isinstance(request, CniFailure):
            result: Outcome | CniFailure = request
        elif request.command == "VERSION":
            result = Outcome(0, version_reply())
        elif request.command == "ADD":
            result = cmd_add(request, environ, stderr)
        elif request.command == "DEL":
            result = cmd_del(request, environ, stderr)
        elif request.command == "STATUS":
            result = cmd_status(request)
        else:  # CHECK and GC: flannel implements neither and reports success
            result = Outcome(0)
    except Exception as exc:  # the process boundary: a JSON reply, never a traceback
        result = CniFailure(ERR_INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    if isinstance(result, CniFailure):
        return Outcome(1, result.to_json(reply_version(cache[0] if cache else b"")))
    return result


def _read_process_stdin() -> bytes:
    if sys.stdin is None:  # started with fd 0 closed
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return sys.stdin.buffer.read()


def main() -> int:
    """Entry point of the ``flannel`` console script and of ``loden cni``."""
    outcome = handle(os.environ, _read_process_stdin, sys.stderr)
    sys.stdout.buffer.write(outcome.stdout)
    sys.stdout.flush()
    return outcome.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
