"""``loden doctor``: look for flannel's known failure modes on this node.

Each module holds the checks of one area; each check returns :class:`Finding` values
(what is wrong, the evidence, the fix) and nothing when all is well. They only read:
doctor never changes the node. The list of areas is :data:`loden.doctor.run.CHECKS`.
"""
