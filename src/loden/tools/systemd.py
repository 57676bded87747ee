"""``loden systemd``: the files the seed guide's ``flannel.sh`` writes.

The guide installs flannel with a script that writes three files (and then runs
``systemctl``): ``/opt/kubernetes/cfg/flanneld`` with ``FLANNEL_OPTIONS="..."``, a
``flanneld.service`` that runs ``flanneld --ip-masq $FLANNEL_OPTIONS`` and then
``mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/subnet.env``, and a
``docker.service`` that runs ``dockerd $DOCKER_NETWORK_OPTIONS`` with the rewritten
subnet.env as its ``EnvironmentFile``. ``render`` writes the same bytes (the heredocs'
``\\``-newline continuations already joined, as bash does) plus two tiny ``/bin/sh``
wrappers at the guide's binary paths that exec Loden, so an operator following the
guide, or the lab reproducing it, gets Loden without editing anything.

How systemd reads those files back (``loden systemd argv``, and the lab, which has no
systemd) is :mod:`loden.tools.systemd_files`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loden.errors import ConfigError, ParseError
from loden.files import replace_file
from loden.tools.systemd_files import under_root, unit_exec_argv

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
