"""Small host-side tools that flannel ships next to flanneld.

Each module here replaces one file of flannel's ``dist/`` or of a classic install
guide (``mk-docker-opts.sh``, the systemd units written by ``flannel.sh``) so that
existing deployments keep working when the binaries are swapped for Loden. Every
tool exposes ``main(argv) -> int``; the ``loden`` CLI dispatches to it.
"""
