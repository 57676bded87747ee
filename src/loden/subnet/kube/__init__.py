"""The Kubernetes subnet manager (``--kube-subnet-mgr``): config/client, annotations,
node→lease, manager. :func:`open_kube_manager` is the entry point."""

from loden.subnet.kube.manager import KubeSubnetManager, open_kube_manager

__all__ = ["KubeSubnetManager", "open_kube_manager"]
