"""subnet.env: missing (and why), or stale (another subnet, network or node than etcd's).

User pain point 1 (``/run/flannel/subnet.env: no such file or directory``) and 3 (a
stale file reused while another host holds the subnet).
"""

from __future__ import annotations

from ipaddress import IPv4Network

from loden.doctor.base import Context, Finding


def _why_missing(ctx: Context) -> str:
    reasons: list[str] = []
    if ctx.agent is None:
        reasons.append(f"the agent is not answering ({ctx.agent_error})")
    elif not ctx.agent.get("ready"):
        reasons.append("the agent runs but is not ready yet (see its log)")
    if not ctx.store.ok:
        reasons.append(f"etcd is not reachable ({ctx.store.error})")
    elif ctx.store.config is None:
        reasons.append(f"etcd has no usable network config ({ctx.store.error or 'missing'})")
    return "; ".join(reasons) or "unknown: read the agent's log"


async def check_subnet_env(ctx: Context) -> list[Finding]:
    env, path = ctx.env, ctx.settings.subnet_file
    if env.get("error") == "missing":
        return [
            Finding(
                "subnet-env/missing",
                f"{path} does not exist: pods stay in ContainerCreating",
                f"why: {_why_missing(ctx)}",
                "start the agent (with the same -subnet-file the CNI plugin reads) and fix "
                "what its log names; `loden config validate` checks the network config",
            )
        ]
    if "error" in env:
        return [
            Finding(
                "subnet-env/unreadable",
                f"{path} cannot be used: {env['error']}",
                f"{path}: {env['error']}",
                "delete the file and restart the agent: it rewrites it atomically",
            )
        ]
    if not ctx.store.ok:
        return []
    subnet = ctx.subnet
    findings: list[Finding] = []
    config = ctx.store.config
    network = ctx.env_values.get("FLANNEL_NETWORK", "")
    if config is not None and config.network is not None and network:
        try:
            differs = IPv4Network(network, strict=False) != config.network
        except ValueError:
            differs = True
        if differs:
            findings.append(
                Finding(
                    "subnet-env/stale-network",
                    f"{path} is stale: its network is not etcd's",
                    f"FLANNEL_NETWORK={network}, etcd config Network={config.network}",
                    "restart the agent so it rewrites subnet.env (every node, after a "
                    "Network change)",
                )
            )
    own = ctx.own
    if subnet is None:
        return findings
    if own is None:
        findings.append(
            Finding(
                "subnet-env/stale-lease",
                f"{path} names subnet {subnet}, but etcd has no lease for it",
                f"no key {subnet.network_address}-{subnet.prefixlen} under "
                f"{ctx.settings.etcd.prefix}/subnets (expired while the agent was down?)",
                "restart the agent: it takes the subnet back if it is still free, or a new one "
                "(then restart the pods, which still use addresses of the old subnet)",
            )
        )
        return findings
    local = {str(a.ip) for a in await ctx.nl.addresses()}
    if str(own.attrs.public_ip) not in local and ctx.settings.iface.public_ip is None:
        findings.append(
            Finding(
                "subnet-env/other-node",
                f"{path} names subnet {subnet}, which etcd gives to another node",
                f"lease {own.key} has PublicIP {own.attrs.public_ip}, not an address of this node",
                "stop using this subnet: delete subnet.env and restart the agent to get a "
                "lease of its own (two nodes with one subnet break both)",
            )
        )
    return findings
