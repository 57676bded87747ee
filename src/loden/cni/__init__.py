"""The flannel CNI meta-plugin (``flannel-io/cni-plugin``), reimplemented.

A container runtime runs the ``flannel`` binary with ``CNI_*`` environment variables
and the network config on stdin. The plugin combines that config with the node's
``subnet.env`` (written by the agent), renders a config for a real plugin (``bridge``
with ``host-local`` IPAM by default), saves it under ``dataDir`` so DEL can undo
exactly what ADD did, and runs that delegate.

Modules: :mod:`loden.cni.types` (CNI protocol values: error codes, versions, error
JSON), :mod:`loden.cni.netconf` (pure parsing and delegate construction) and
:mod:`loden.cni.plugin` (the process entry point: environment, files, delegate exec).
"""
