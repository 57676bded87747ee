"""A Kubernetes API server double: nodes, pods and namespaces over HTTPS, as the real one.

No kube-apiserver can run on the project's machines, so the Kubernetes subnet manager,
its tests and ``loden lab --store kube`` talk to this server instead. It keeps the
behaviour clients depend on: one global monotonic ``resourceVersion`` counter, list and
watch with replay from a version, ``410 Gone``/``Expired`` once a version is compacted,
bookmarks, chunked watch streams, JSON-merge, strategic-merge and JSON patches, the
``status`` subresource with the real node/pod status strategies, ``409 Conflict``,
bearer-token and client-certificate authentication, RBAC-style authorization with the
real ``Forbidden`` messages, discovery and server-side Table output for ``kubectl``.

Layout: :mod:`.status` (Status errors), :mod:`.store` (objects, versions, history,
watchers), :mod:`.selectors`, :mod:`.patch`, :mod:`.resources` (per-kind strategy,
validation, tables, discovery), :mod:`.auth`, :mod:`.http` (HTTP/1.1 over asyncio with
h11), :mod:`.api` (the REST handlers), :mod:`.server` (ties them together plus the
``/_loden/`` control endpoints) and :mod:`.control` (start it as a process and drive it).
Run it with ``python -m loden.kubeapi --help``.
"""
