"""Loden: a flannel-compatible container network fabric."""

import sys

__version__ = "0.1.0"

# httpx imports its command-line tool (httpx._main: click, rich, pygments) whenever
# those happen to be installed, as rich is here for the lab: ~5 MB of the agent's RSS
# for code it never runs. Marking the module absent makes httpx skip it (it catches the
# ImportError); the `httpx` console script runs in its own process and is unaffected.
if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
    sys.modules["httpx._main"] = None  # type: ignore[assignment]
