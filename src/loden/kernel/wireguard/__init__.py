"""WireGuard plumbing, one job per module.

* :mod:`.keys`: private/public keys and the key file (``/run/flannel/wgkey``);
* :mod:`.uapi`: peer and device values, the UAPI text codec and socket client
  (how a user-space device is configured);
* :mod:`.process`: the supervised ``wireguard-go`` serving a device where the kernel
  has no WireGuard;
* :mod:`.kernel`: the kernel's own ``wireguard`` link (flannel's state), configured
  with ``wg``, and the run-time check of which of the two this kernel offers.

The names below are re-exported for callers that import from the package.
"""

from loden.kernel.wireguard.keys import (
    decode_key,
    encode_key,
    generate_private_key,
    load_or_create_private_key,
    public_key_of,
    write_key_file,
)
from loden.kernel.wireguard.process import WireguardGo
from loden.kernel.wireguard.uapi import (
    DeviceState,
    PeerConfig,
    PeerStatus,
    Uapi,
    endpoint_text,
    parse_get,
    render_set,
    socket_path,
)

__all__ = [
    "DeviceState",
    "PeerConfig",
    "PeerStatus",
    "Uapi",
    "WireguardGo",
    "decode_key",
    "encode_key",
    "endpoint_text",
    "generate_private_key",
    "load_or_create_private_key",
    "parse_get",
    "public_key_of",
    "render_set",
    "socket_path",
    "write_key_file",
]
