"""Loden: a flannel-compatible container network fabric."""

__version__ = "0.1.0"
