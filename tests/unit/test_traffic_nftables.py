"""Pure tests of the nftables-mode text: listings (the e2e goldens) and transactions."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

from loden.traffic.nftables import (
    FULLY_RANDOM_PROBE,
    forward_chain,
    masq_chain,
    normalise_listing,
    tables_script,
)

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.1.0/24")

# spec §7.5, from flannel's e2e/rules.go (tabs as nft prints them)
POSTRTG_GOLDEN = """\
table ip flannel-ipv4 {
\tchain postrtg {
\t\tcomment "chain to manage traffic masquerading by flannel"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
\t\tip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
\t}
}
"""

FORWARD_GOLDEN = """\
table ip flannel-ipv4 {
\tchain forward {
\t\tcomment "chain to accept flannel traffic"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.244.0.0/16 accept
\t\tip daddr 10.244.0.0/16 accept
\t}
}
"""


def test_postrtg_listing_is_the_golden() -> None:
    assert masq_chain(N, S, random_fully=True).listing() == POSTRTG_GOLDEN


def test_forward_listing_is_the_golden() -> None:
    assert forward_chain(N).listing() == FORWARD_GOLDEN


def test_without_fully_random() -> None:
    listing = masq_chain(N, S, random_fully=False).listing()
    assert listing == POSTRTG_GOLDEN.replace(" fully-random", "")


def test_ipv6_chain() -> None:
    chain = masq_chain(
        IPv6Network("fd00:10::/56"), IPv6Network("fd00:10:0:1::/64"), random_fully=True
    )
    assert (chain.nft_family, chain.table) == ("ip6", "flannel-ipv6")
    assert chain.rules[3] == "ip6 saddr != fd00:10:0:1::/64 ip6 daddr fd00:10::/56 return"
    assert chain.rules[4] == "ip6 saddr fd00:10::/56 ip6 daddr != ff00::/8 masquerade fully-random"


def test_transaction_text() -> None:
    assert forward_chain(N).transaction() == (
        'add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }\n'
        "add chain ip flannel-ipv4 forward { type filter hook forward priority filter ; "
        'comment "chain to accept flannel traffic" ; }\n'
        "flush chain ip flannel-ipv4 forward\n"
        "add rule ip flannel-ipv4 forward ip saddr 10.244.0.0/16 accept\n"
        "add rule ip flannel-ipv4 forward ip daddr 10.244.0.0/16 accept\n"
    )


def test_tables_script_creates_both_families() -> None:
    assert tables_script() == (
        'add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }\n'
        'add table ip6 flannel-ipv6 { comment "rules for flannel-ipv6" ; }\n'
    )
    assert "masquerade fully-random" in FULLY_RANDOM_PROBE


def test_normalise_listing_ignores_indentation() -> None:
    spaced = POSTRTG_GOLDEN.replace("\t", "    ") + "\n\n"
    assert normalise_listing(spaced) == normalise_listing(POSTRTG_GOLDEN)
