"""``loden status``: what this node's agent is doing and whether the kernel agrees.

* :mod:`loden.status.agent_view`: the agent's side, the ``/status`` JSON document;
* :mod:`loden.status.expected`: the kernel entries a set of leases needs, and the diff
  against what the kernel holds (works without the agent);
* :mod:`loden.status.collect`: gather agent, subnet.env, store and kernel into one report;
* :mod:`loden.status.cli`: the command, text or ``--json``.
"""
