"""Fuzzing lease values: what Loden accepts it can write back (chaos issue, scenario 9).

test_model_lease.py checks that any bytes raise only LeaseFormatError. This adds the
round trip found by fuzz/fuzz_lease.py: a lease that parsed must render to JSON that
parses again to the same value (a number like 5E821 used to parse to infinity and render
as ``Infinity``, which no JSON reader accepts).
"""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from loden.errors import LeaseFormatError
from loden.model.lease import LeaseAttrs

NUMBERS = st.integers() | st.floats(allow_nan=False, allow_infinity=False)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
RAW_NUMBERS = st.sampled_from(["5E821", "-1e400", "1e308", "0.1", "12345678901234567890123"])


@st.composite
def lease_values(draw: st.DrawFn) -> bytes:
    obj = {
        "PublicIP": draw(st.sampled_from(["10.0.0.1", "192.0.2.7"])),
        "BackendType": draw(st.sampled_from(["vxlan", "host-gw", "wireguard", ""])),
        "BackendData": draw(JSON),
        "BackendV6Data": draw(JSON),
    }
    text = json.dumps(obj)
    # Splice in a number token as written by some other client (Python cannot make 5E821).
    return text.replace("null", draw(RAW_NUMBERS), draw(st.integers(0, 1))).encode()


@settings(max_examples=400, deadline=None)
@given(lease_values())
@example(b'{"Pubic":{"PublicK":5180},"BackendV6Data":{"PoAt":5E821}}')
def test_parsed_leases_survive_a_round_trip(raw: bytes) -> None:
    try:
        attrs = LeaseAttrs.parse(raw, key="10.5.3.0-24")
    except LeaseFormatError:
        return
    assert LeaseAttrs.parse(attrs.to_json()) == attrs
    assert LeaseAttrs.parse(attrs.to_json(legacy=True)).backend_data == attrs.backend_data
