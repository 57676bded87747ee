"""Authentication (bearer tokens, client certificates, anonymous) and RBAC-style authorization.

Authentication follows kube-apiserver's union: a verified client certificate gives the
user ``CN`` with groups ``O``; else a bearer token from the token table; a token that
is not in the table is ``401`` even when anonymous access is on; no credentials at all
make ``system:anonymous`` (group ``system:unauthenticated``) when anonymous access is on.

Authorization evaluates RBAC ``PolicyRule`` objects (``verbs``, ``apiGroups``,
``resources`` with ``res/subres``, ``resourceNames``, ``nonResourceURLs``) bound to a
user or a group, plus the built-in bindings every cluster has: ``system:masters`` may do
everything, everyone may read ``/version`` and the health endpoints, authenticated
users may read discovery. A denial carries the real ``forbiddenMessage`` text.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loden.kubeapi.status import forbidden, unauthorized

JsonObject = dict[str, Any]

ADMIN_GROUP = "system:masters"
ANONYMOUS = "system:anonymous"
PUBLIC_PATHS = ("/version", "/version/", "/healthz", "/livez", "/readyz")
DISCOVERY_PATHS = ("/api", "/api/*", "/apis", "/apis/*", "/openapi/*")


@dataclass(frozen=True, slots=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""

    def in_group(self, group: str) -> bool:
        return group in self.groups


def service_account(namespace: str, name: str) -> User:
    """The user a service-account token authenticates as."""
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


@dataclass(frozen=True, slots=True)
class Attributes:
    """What a request asks to do (authorizer.Attributes)."""

    user: User
    verb: str
    path: str
    resource: str = ""  # "" for a non-resource request
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    api_group: str = ""

    @property
    def is_resource_request(self) -> bool:
        return bool(self.resource)


@dataclass
class Authenticator:
    tokens: dict[str, User] = field(default_factory=dict)
    anonymous: bool = True

    def authenticate(self, authorization: str | None, peer_cert: JsonObject | None) -> User:
        """:raises ApiError: 401 for a bad token or (anonymous off) no credentials."""
        if peer_cert:
            user = user_from_cert(peer_cert)
            if user is not None:
                return user
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip() in self.tokens:
                return self.tokens[token.strip()]
            raise unauthorized()
        if self.anonymous:
            return User(ANONYMOUS, ("system:unauthenticated",))
        raise unauthorized()


def user_from_cert(cert: Mapping[str, Any]) -> User | None:
    """CN is the user, every O a group (as the x509 authenticator maps a verified cert)."""
    common, orgs = "", []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common = value
            elif key == "organizationName":
                orgs.append(value)
    if not common:
        return None
    return User(common, (*orgs, "system:authenticated"))


@dataclass
class Authorizer:
    """Rules bound to ``user:<name>`` or ``group:<name>`` subjects."""

    bindings: dict[str, list[JsonObject]] = field(default_factory=dict)

    def set_rules(self, subject: str, rules: Sequence[JsonObject]) -> None:
        if not subject.startswith(("user:", "group:")):
            raise ValueError(f"subject {subject!r} must start with 'user:' or 'group:'")
        self.bindings[subject] = [dict(rule) for rule in rules]

    def rules_for(self, user: User) -> Iterable[JsonObject]:
        yield from self.bindings.get(f"user:{user.name}", ())
        for group in user.groups:
            yield from self.bindings.get(f"group:{group}", ())

    def allowed(self, attrs: Attributes) -> bool:
        user = attrs.user
        if user.in_group(ADMIN_GROUP):
            return True
        if not attrs.is_resource_request:
            if attrs.verb == "get" and attrs.path in PUBLIC_PATHS:
                return True
            if attrs.verb == "get" and user.in_group("system:authenticated"):
                if any(fnmatch.fnmatchcase(attrs.path, pattern) for pattern in DISCOVERY_PATHS):
                    return True
        return any(_rule_allows(rule, attrs) for rule in self.rules_for(user))

    def authorize(self, attrs: Attributes) -> None:
        """:raises ApiError: 403 with kube-apiserver's message."""
        if not self.allowed(attrs):
            raise forbidden(attrs.resource, attrs.name, forbidden_message(attrs))


def _matches(values: Iterable[str], wanted: str) -> bool:
    return any(v == "*" or v == wanted for v in values)


def _rule_allows(rule: Mapping[str, Any], attrs: Attributes) -> bool:
    if not _matches(rule.get("verbs", ()), attrs.verb):
        return False
    if not attrs.is_resource_request:
        return any(
            url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1]))
            for url in rule.get("nonResourceURLs", ())
        )
    if not _matches(rule.get("apiGroups", ()), attrs.api_group):
        return False
    combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    resources = rule.get("resources", ())
    if not any(
        r == "*"
        or r == combined
        or (r.startswith("*/") and attrs.subresource and r[2:] == attrs.subresource)
        or (r.endswith("/*") and r[:-2] == attrs.resource and attrs.subresource)
        for r in resources
    ):
        return False
    names = rule.get("resourceNames") or ()
    return not names or attrs.name in names


def forbidden_message(attrs: Attributes) -> str:
    """apiserver's ``forbiddenMessage`` (handlers/responsewriters/errors.go)."""
    who = attrs.user.name
    if not attrs.is_resource_request:
        return f'User "{who}" cannot {attrs.verb} path "{attrs.path}"'
    resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    if attrs.namespace:
        return (
            f'User "{who}" cannot {attrs.verb} resource "{resource}" in API group '
            f'"{attrs.api_group}" in the namespace "{attrs.namespace}"'
        )
    return (
        f'User "{who}" cannot {attrs.verb} resource "{resource}" in API group '
        f'"{attrs.api_group}" at the cluster scope'
    )


FLANNEL_RULES: tuple[JsonObject, ...] = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
)
"""The ClusterRole ``flannel`` of kube-flannel.yml."""


__all__ = [
    "ADMIN_GROUP",
    "FLANNEL_RULES",
    "Attributes",
    "Authenticator",
    "Authorizer",
    "User",
    "service_account",
]
