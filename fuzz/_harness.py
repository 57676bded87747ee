"""Shared by the atheris harnesses in this directory (not a harness itself).

Each ``fuzz_*.py`` defines ``test_one_input(data: bytes)`` that raises only when it
finds a bug (an exception other than the target's documented error, or a broken
property), and calls :func:`run`. atheris is not a project dependency: install it where
you run the harnesses, e.g. ``python -m venv /tmp/fz && /tmp/fz/bin/pip install atheris``
and ``PYTHONPATH=/tmp/fz/lib/python3.11/site-packages .venv/bin/python fuzz/fuzz_config.py
-runs=100000``. libFuzzer flags (``-runs=N``, ``-max_total_time=S``, a corpus directory)
pass through.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

# Run from a checkout without installing: make ``import loden`` find src/, and the
# packet builders of tests/fixtures (seed material) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

try:
    import atheris  # type: ignore[import-not-found, import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - only without the optional fuzzer
    sys.stderr.write(
        "atheris is not installed: pip install atheris (into a scratch venv; see fuzz/README.md)\n"
    )
    raise SystemExit(2) from None


def instrumented() -> AbstractContextManager[Any]:
    """Context manager: modules imported inside it get coverage instrumentation."""
    return cast(AbstractContextManager[Any], atheris.instrument_imports())


def text(data: bytes) -> str:
    """The input as text, the way a file or an etcd value would be decoded."""
    return data.decode("utf-8", "surrogateescape")


def run(test_one_input: Callable[[bytes], None], seeds: Sequence[bytes] = ()) -> None:
    """Fuzz ``test_one_input``. Without a corpus directory on the command line, start
    from ``seeds`` (valid inputs: mutating them reaches far more code than random bytes)
    in a fresh temporary corpus directory."""
    argv = list(sys.argv)
    if seeds and not any(not a.startswith("-") for a in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=f"loden-{Path(argv[0]).stem}-"))
        for i, seed in enumerate(seeds):
            (corpus / f"seed{i}").write_bytes(seed)
        argv.append(str(corpus))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
