"""A small evaluator of Kubernetes NetworkPolicies, enough to test who may reach whom.

It implements the documented semantics for the features the manifests use: a pod is isolated
for a direction when at least one policy of that type selects it, and then a connection is
allowed when any rule of any selecting policy admits the peer and the port. Peers are pods,
identified by their labels and their namespace's labels; ``podSelector`` alone means the
policy's own namespace (policies must carry ``metadata.namespace``, as kustomize sets it).
``matchExpressions`` and ``ipBlock`` are refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pod:
    labels: Mapping[str, str]
    namespace: str
    namespace_labels: Mapping[str, str]


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector: ``{}`` selects everything; only ``matchLabels`` is supported."""
    if selector is None:
        return False
    assert "matchExpressions" not in selector, "matchExpressions not supported by this evaluator"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Pod) -> bool:
    assert "ipBlock" not in peer, "ipBlock not supported by this evaluator"
    pod_selector, ns_selector = peer.get("podSelector"), peer.get("namespaceSelector")
    if ns_selector is None:
        in_namespace = other.namespace == policy_namespace
    else:
        in_namespace = selects(ns_selector, other.namespace_labels)
    return in_namespace and (pod_selector is None or selects(pod_selector, other.labels))


def _port_matches(ports: Iterable[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    ports = list(ports or [])
    if not ports:
        return True
    return any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports)


def allowed(
    policies: Iterable[Mapping[str, Any]],
    *,
    source: Pod,
    destination: Pod,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether both the source's egress and the destination's ingress allow the connection."""
    policies = list(policies)
    return _direction_allows(
        policies,
        "Egress",
        "egress",
        "to",
        subject=source,
        peer=destination,
        port=port,
        protocol=protocol,
    ) and _direction_allows(
        policies,
        "Ingress",
        "ingress",
        "from",
        subject=destination,
        peer=source,
        port=port,
        protocol=protocol,
    )


def _direction_allows(
    policies: list[Mapping[str, Any]],
    policy_type: str,
    rules_key: str,
    peers_key: str,
    *,
    subject: Pod,
    peer: Pod,
    port: int,
    protocol: str,
) -> bool:
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and selects(p["spec"]["podSelector"], subject.labels)
        and policy_type in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        namespace = policy["metadata"]["namespace"]
        for rule in policy["spec"].get(rules_key, []) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(p, namespace, peer) for p in peers)
            if peer_ok and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False
