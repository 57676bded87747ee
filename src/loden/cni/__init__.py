"""The flannel CNI meta-plugin (``flannel-io/cni-plugin``), reimplemented.

A container runtime runs the ``flannel`` binary with ``CNI_*`` environment variables
and the network config on stdin. The plugin combines that config with the node's
``subnet.env`` (written by the agent), renders a config for a real plugin (``bridge``
with ``host-local`` IPAM by default), saves it under ``dataDir`` so DEL can undo
exactly what ADD did, and runs that delegate.

Modules: :mod:`loden.cni.types` (CNI protocol values: error codes, versions, error
JSON), :mod:`loden.cni.netconf` (the input config, Go-JSON),
:mod:`loden.cni.subnet_env` (subnet.env the plugin's way),
:mod:`loden.cni.delegate` (the delegate config) and :mod:`loden.cni.plugin` (the
process entry point: environment, files, delegate exec).
"""
