"""The kinds the double serves (nodes, pods, namespaces) and what the real registry does with them.

Each :class:`Kind` holds its strategy: defaults on create, what an update of the main
resource or of the ``status`` subresource may change (nodes: the main resource keeps the
old status, ``/status`` keeps the old spec *and applies metadata*, which is where
flanneld writes its annotations), validation with the real field-error wording, the
strategic-merge keys, the fields a ``fieldSelector`` may use, discovery entries and the
server-side Table columns ``kubectl get`` asks for.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from loden.kubeapi.patch import PRIMITIVE_SET
from loden.kubeapi.status import bad_request, invalid

JsonObject = dict[str, Any]

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    """apimachinery's ``duration.HumanDuration`` (the AGE column)."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years = hours // (24 * 365)
    if years < 8:
        return f"{years}y{(hours // 24) % 365}d"
    return f"{years}y"


def age(obj: JsonObject) -> str:
    stamp = obj.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return "<unknown>"
    created = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return human_duration((datetime.datetime.now(datetime.UTC) - created).total_seconds())


def column(
    name: str, kind: str, description: str, *, priority: int = 0, fmt: str = ""
) -> JsonObject:
    return {
        "name": name,
        "type": kind,
        "format": fmt,
        "description": description,
        "priority": priority,
    }


NAME_COLUMN = column(
    "Name",
    "string",
    "Name must be unique within a namespace. Is required when creating resources, although "
    "some resources may allow a client to request the generation of an appropriate name "
    "automatically. Name is primarily intended for creation idempotence and configuration "
    "definition. Cannot be updated. More info: "
    "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    fmt="name",
)
AGE_COLUMN = column(
    "Age",
    "string",
    "CreationTimestamp is a timestamp representing the server time when this object was "
    "created. It is not guaranteed to be set in happens-before order across separate "
    "operations. Clients may not set this value. It is represented in RFC3339 form and is "
    "in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
)


@dataclass(frozen=True)
class Kind:
    """One served resource and its registry strategy."""

    resource: str
    kind: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    merge_keys: dict[str, str] = field(default_factory=dict)
    field_selectors: frozenset[str] = frozenset({"metadata.name", "metadata.namespace"})

    # ------------------------------------------------------------ naming

    def validate_name(self, name: str) -> list[tuple[str, str, str]]:
        if not name:
            return [
                (
                    "metadata.name",
                    "FieldValueRequired",
                    "metadata.name: Required value: name or generateName is required",
                )
            ]
        if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            return [
                (
                    "metadata.name",
                    "FieldValueInvalid",
                    f'metadata.name: Invalid value: "{name}": {_SUBDOMAIN_MSG}',
                )
            ]
        return []

    # ------------------------------------------------------------ strategy

    def prepare_create(self, obj: JsonObject) -> None:
        """Registry defaults; ``obj`` already has the generic metadata."""

    def prepare_update(self, new: JsonObject, old: JsonObject, subresource: str) -> None:
        """Keep what this endpoint may not change: status on the main resource, spec on /status."""
        if subresource == "status":
            if "spec" in old:
                new["spec"] = old["spec"]
            else:
                new.pop("spec", None)
        elif "status" in old:
            new["status"] = old["status"]
        else:
            new.pop("status", None)

    def normalize(self, obj: JsonObject) -> None:
        """What the v1 conversion round trip does to every written object."""

    def validate(self, obj: JsonObject, old: JsonObject | None) -> list[tuple[str, str, str]]:
        return []

    # ------------------------------------------------------------ presentation

    def discovery(self) -> list[JsonObject]:
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        main: JsonObject = {
            "name": self.resource,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        status = {
            "name": f"{self.resource}/status",
            "singularName": "",
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["get", "patch", "update"],
        }
        return [main, status]

    def columns(self) -> list[JsonObject]:
        return [NAME_COLUMN, AGE_COLUMN]

    def cells(self, obj: JsonObject) -> list[Any]:
        return [obj["metadata"]["name"], age(obj)]


def _condition(obj: JsonObject, kind: str) -> JsonObject | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None


class NodeKind(Kind):
    def normalize(self, obj: JsonObject) -> None:
        spec = obj.setdefault("spec", {})
        if spec.get("podCIDR") and not spec.get("podCIDRs"):
            spec["podCIDRs"] = [spec["podCIDR"]]
        elif spec.get("podCIDRs"):
            spec["podCIDR"] = spec["podCIDRs"][0]
        obj.setdefault("status", {})

    def validate(self, obj: JsonObject, old: JsonObject | None) -> list[tuple[str, str, str]]:
        errors: list[tuple[str, str, str]] = []
        cidrs = obj.get("spec", {}).get("podCIDRs") or []
        families: list[int] = []
        for index, cidr in enumerate(cidrs):
            try:
                families.append(ipaddress.ip_network(cidr, strict=False).version)
            except (ValueError, TypeError):
                errors.append(
                    (
                        f"spec.podCIDRs[{index}]",
                        "FieldValueInvalid",
                        f'spec.podCIDRs[{index}]: Invalid value: "{cidr}": must be a valid CIDR '
                        "value, "
                        "(e.g. 10.9.8.0/24 or 2001:db8::/64)",
                    )
                )
        if len(cidrs) > 2 or len(set(families)) != len(families):
            shown = "[]string{" + ", ".join(f'"{c}"' for c in cidrs) + "}"
            errors.append(
                (
                    "spec.podCIDRs",
                    "FieldValueInvalid",
                    f"spec.podCIDRs: Invalid value: {shown}: may specify no more than one CIDR "
                    "for each IP family",
                )
            )
        if old is not None:
            before = old.get("spec", {}).get("podCIDRs") or []
            if before and before != cidrs:
                errors.append(
                    (
                        "spec.podCIDRs",
                        "FieldValueForbidden",
                        "spec.podCIDRs: Forbidden: node updates may not change podCIDR except "
                        'from "" to valid',
                    )
                )
        return errors

    def columns(self) -> list[JsonObject]:
        return [
            NAME_COLUMN,
            column("Status", "string", "The status of the node"),
            column("Roles", "string", "The roles of the node"),
            AGE_COLUMN,
            column("Version", "string", "Kubelet Version reported by the node."),
            column(
                "Internal-IP",
                "string",
                "List of addresses reachable to the node. Queried from cloud provider, if "
                "available. More info: "
                "https://kubernetes.io/docs/reference/node/node-status/#addresses",
                priority=1,
            ),
            column(
                "External-IP",
                "string",
                "List of addresses reachable to the node. Queried from cloud provider, if "
                "available. More info: "
                "https://kubernetes.io/docs/reference/node/node-status/#addresses",
                priority=1,
            ),
            column(
                "OS-Image",
                "string",
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 "
                "(wheezy)).",
                priority=1,
            ),
            column(
                "Kernel-Version",
                "string",
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
                priority=1,
            ),
            column(
                "Container-Runtime",
                "string",
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. "
                "containerd://1.4.2).",
                priority=1,
            ),
        ]

    def cells(self, obj: JsonObject) -> list[Any]:
        ready = _condition(obj, "Ready")
        state = "Unknown"
        if ready is not None:
            state = {"True": "Ready", "False": "NotReady"}.get(ready.get("status", ""), "Unknown")
        if obj.get("spec", {}).get("unschedulable"):
            state += ",SchedulingDisabled"
        labels = obj["metadata"].get("labels") or {}
        roles = sorted(
            key.split("/", 1)[1]
            for key in labels
            if key.startswith("node-role.kubernetes.io/") and key.split("/", 1)[1]
        )
        status = obj.get("status", {})
        info = status.get("nodeInfo") or {}

        def address(kind: str) -> str:
            found = [
                a.get("address", "") for a in status.get("addresses") or [] if a.get("type") == kind
            ]
            return ",".join(found) if found else "<none>"

        return [
            obj["metadata"]["name"],
            state,
            ",".join(roles) if roles else "<none>",
            age(obj),
            info.get("kubeletVersion", ""),
            address("InternalIP"),
            address("ExternalIP"),
            info.get("osImage") or "<unknown>",
            info.get("kernelVersion") or "<unknown>",
            info.get("containerRuntimeVersion") or "<unknown>",
        ]


class PodKind(Kind):
    def prepare_create(self, obj: JsonObject) -> None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("securityContext", {})
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("serviceAccountName", "default")
        spec["serviceAccount"] = spec["serviceAccountName"]
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        for container in spec.get("containers") or []:
            if isinstance(container, dict):
                image = str(container.get("image", ""))
                latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
                container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
                container.setdefault("resources", {})
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}

    def validate(self, obj: JsonObject, old: JsonObject | None) -> list[tuple[str, str, str]]:
        containers = obj.get("spec", {}).get("containers")
        if not containers:
            return [("spec.containers", "FieldValueRequired", "spec.containers: Required value")]
        errors: list[tuple[str, str, str]] = []
        for index, container in enumerate(containers):
            for key in ("name", "image"):
                if not isinstance(container, dict) or not container.get(key):
                    path = f"spec.containers[{index}].{key}"
                    errors.append((path, "FieldValueRequired", f"{path}: Required value"))
        if old is not None:

            def mutable_masked(pod: JsonObject) -> JsonObject:
                spec = dict(pod.get("spec", {}))
                spec["containers"] = [
                    {k: v for k, v in c.items() if k != "image"}
                    for c in spec.get("containers") or []
                ]
                spec.pop("tolerations", None)
                spec.pop("activeDeadlineSeconds", None)
                return spec

            if mutable_masked(obj) != mutable_masked(old):
                errors.append(
                    (
                        "spec",
                        "FieldValueForbidden",
                        "spec: Forbidden: pod updates may not change fields other than "
                        "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                        "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to "
                        "existing tolerations),`spec.terminationGracePeriodSeconds` (allow it "
                        "to be set to 1 if it was previously negative)",
                    )
                )
        return errors

    def columns(self) -> list[JsonObject]:
        return [
            NAME_COLUMN,
            column(
                "Ready",
                "string",
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            column("Status", "string", "The aggregate status of the containers in this pod."),
            column(
                "Restarts",
                "string",
                "The number of times the containers in this pod have been restarted and when the "
                "last container in this pod has restarted.",
            ),
            AGE_COLUMN,
            column(
                "IP",
                "string",
                "IP address allocated to the pod. Routable at least within the cluster. Empty if "
                "not yet allocated.",
                priority=1,
            ),
            column(
                "Node",
                "string",
                "NodeName is a request to schedule this pod onto a specific node. If it is "
                "non-empty, the scheduler simply schedules this pod onto that node, assuming that "
                "it fits resource requirements.",
                priority=1,
            ),
            column(
                "Nominated Node",
                "string",
                "nominatedNodeName is set only when this pod preempts other pods on the node, but "
                "it cannot be scheduled right away as preemption victims receive their graceful "
                "termination periods.",
                priority=1,
            ),
            column(
                "Readiness Gates",
                "string",
                "If specified, all readiness gates will be evaluated for pod readiness.",
                priority=1,
            ),
        ]

    def cells(self, obj: JsonObject) -> list[Any]:
        spec, status = obj.get("spec", {}), obj.get("status", {})
        statuses = status.get("containerStatuses") or []
        ready = sum(1 for s in statuses if s.get("ready"))
        restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
        return [
            obj["metadata"]["name"],
            f"{ready}/{len(spec.get('containers') or [])}",
            status.get("reason") or status.get("phase", ""),
            restarts,
            age(obj),
            status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>",
            status.get("nominatedNodeName") or "<none>",
            "<none>",
        ]


class NamespaceKind(Kind):
    def validate_name(self, name: str) -> list[tuple[str, str, str]]:
        if name and (len(name) > 63 or not _DNS1123_LABEL.match(name)):
            return [
                (
                    "metadata.name",
                    "FieldValueInvalid",
                    f'metadata.name: Invalid value: "{name}": {_LABEL_MSG}',
                )
            ]
        return super().validate_name(name)

    def prepare_create(self, obj: JsonObject) -> None:
        obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
        obj["status"] = {"phase": "Active"}
        labels = obj["metadata"].setdefault("labels", {})
        labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]

    def columns(self) -> list[JsonObject]:
        return [NAME_COLUMN, column("Status", "string", "The status of the namespace"), AGE_COLUMN]

    def cells(self, obj: JsonObject) -> list[Any]:
        return [obj["metadata"]["name"], obj.get("status", {}).get("phase", ""), age(obj)]


NODES = NodeKind(
    "nodes",
    "Node",
    "node",
    namespaced=False,
    short_names=("no",),
    merge_keys={
        "metadata.finalizers": PRIMITIVE_SET,
        "metadata.ownerReferences": "uid",
        "spec.podCIDRs": PRIMITIVE_SET,
        "status.conditions": "type",
        "status.addresses": "type",
    },
    field_selectors=frozenset({"metadata.name", "spec.unschedulable"}),
)
PODS = PodKind(
    "pods",
    "Pod",
    "pod",
    namespaced=True,
    short_names=("po",),
    categories=("all",),
    merge_keys={
        "metadata.finalizers": PRIMITIVE_SET,
        "metadata.ownerReferences": "uid",
        "spec.containers": "name",
        "spec.containers[].ports": "containerPort",
        "spec.containers[].env": "name",
        "spec.containers[].volumeMounts": "mountPath",
        "spec.initContainers": "name",
        "spec.initContainers[].env": "name",
        "spec.initContainers[].volumeMounts": "mountPath",
        "spec.volumes": "name",
        "spec.imagePullSecrets": "name",
        "status.conditions": "type",
        "status.podIPs": "ip",
    },
    field_selectors=frozenset(
        {
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
)
NAMESPACES = NamespaceKind(
    "namespaces",
    "Namespace",
    "namespace",
    namespaced=False,
    short_names=("ns",),
    merge_keys={"metadata.finalizers": PRIMITIVE_SET, "status.conditions": "type"},
    field_selectors=frozenset({"metadata.name", "status.phase"}),
)

KINDS: dict[str, Kind] = {k.resource: k for k in (NODES, PODS, NAMESPACES)}
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def check_metadata(obj: JsonObject) -> None:
    """Labels and annotations must be string maps (a Go decode error otherwise).

    :raises ApiError: 400 as the real server's decoder answers.
    """
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise bad_request("Object 'metadata' is missing or not an object")
    for name in ("labels", "annotations"):
        values = meta.get(name)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise bad_request(
                f"json: cannot unmarshal {_go_type(values)} into Go struct field "
                f"ObjectMeta.metadata.{name} of type map[string]string"
            )
        for value in values.values():
            if not isinstance(value, str):
                raise bad_request(
                    f"json: cannot unmarshal {_go_type(value)} into Go struct field "
                    f"ObjectMeta.metadata.{name} of type string"
                )


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def new_metadata(kind: Kind, obj: JsonObject, namespace: str) -> None:
    """Server-set metadata of a new object (name from generateName, uid, timestamps)."""
    meta = obj["metadata"]
    if not meta.get("name") and meta.get("generateName"):
        alphabet = "bcdfghjklmnpqrstvwxz2456789"
        meta["name"] = meta["generateName"] + "".join(secrets.choice(alphabet) for _ in range(5))
    if kind.namespaced:
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now_rfc3339()
    for server_set in ("deletionTimestamp", "selfLink"):
        meta.pop(server_set, None)


def require_valid(kind: Kind, obj: JsonObject, old: JsonObject | None) -> None:
    """:raises ApiError: 422 with every field error, as one Status."""
    name = obj["metadata"].get("name", "")
    errors = kind.validate_name(name) if old is None else []
    errors += kind.validate(obj, old)
    if errors:
        raise invalid(kind.kind, name, errors)


__all__ = ["INITIAL_NAMESPACES", "KINDS", "Kind", "check_metadata", "new_metadata", "require_valid"]
