"""The agent itself: running, healthy, ready."""

from __future__ import annotations

from loden.doctor.base import Context, Finding


async def check_agent(ctx: Context) -> list[Finding]:
    if ctx.agent is None:
        if not ctx.settings.healthz_port:
            return []  # nothing to ask; subnet.env and the kernel checks still speak
        return [
            Finding(
                "agent/down",
                "the agent is not answering on its health port",
                ctx.agent_error,
                "start it (systemctl start flanneld) and read its log if it exits",
            )
        ]
    problems = ctx.agent.get("problems") or []
    if not problems:
        return []
    return [
        Finding(
            "agent/unhealthy",
            "the agent reports problems (its /healthz answers 503)",
            "; ".join(str(p) for p in problems),
            "see `loden status` and the agent's log",
        )
    ]
