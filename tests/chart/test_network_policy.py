"""NetworkPolicies: every pod of the release is fenced in for Ingress and Egress; workers
reach only DNS, Redis and S3 (train peers of a multi-node run also each other), only the
controller reaches the API server, and the bundled Redis and MinIO accept only this
release's pods. Selectors are evaluated against the labels the pods really carry (the
stage pods as the controller's launcher renders them)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mia_dpo.runtime.k8s_launcher import render_job
from tests.chart.chart import (
    RELEASE,
    STAGES,
    Rendered,
    render,
    scenario_file,
    template,
    tool,
    values_for,
)

RELEASE_LABELS = {"app.kubernetes.io/name": "mia-dpo", "app.kubernetes.io/instance": RELEASE}
DNS_TO = [
    {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
]
DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
API_PORTS = {443, 6443}

# ------------------------------------------------------------------------ helpers


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector selects everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and key in labels and labels[key] in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def pods(r: Rendered, run_id: str) -> dict[str, dict[str, str]]:
    """Every pod the release can start -> its labels: workloads, the test pod, and each
    stage's pod as the controller creates it (render_job adds its labels)."""
    out: dict[str, dict[str, str]] = {}
    for o in r.objects:
        if o["kind"] in ("Job", "Deployment"):
            out[o["metadata"]["name"]] = o["spec"]["template"]["metadata"]["labels"]
        elif o["kind"] == "Pod":
            out[o["metadata"]["name"]] = o["metadata"]["labels"]
    for stage, template_job in r.jobs.items():
        job = render_job(template_job, run_id, stage, 1, None)
        out[f"stage/{stage}"] = job["spec"]["template"]["metadata"]["labels"]
    return out


def policies_for(r: Rendered, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [p for p in r.kind("NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def egress_of(r: Rendered, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [rule for p in policies_for(r, labels) for rule in p["spec"].get("egress") or []]


def ingress_of(r: Rendered, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [rule for p in policies_for(r, labels) for rule in p["spec"].get("ingress") or []]


def key(rule: dict[str, Any]) -> str:
    return json.dumps(rule, sort_keys=True)


def same_rules(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    return sorted(map(key, got)) == sorted(map(key, expected))


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"port": p, "protocol": "TCP"} for p in ports]


def bundled(component: str) -> list[dict[str, Any]]:
    labels = {**RELEASE_LABELS, "app.kubernetes.io/component": component}
    return [{"podSelector": {"matchLabels": labels}}]


def service_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The DNS, Redis and S3 egress rules the values call for."""
    np = values["networkPolicy"]
    rules = [{"to": np["dns"]["to"], "ports": np["dns"]["ports"]}]
    if values["redis"]["enabled"]:
        rules.append({"to": bundled("redis"), "ports": tcp(values["redis"]["port"])})
    else:
        rules.append(external(np["redisEgress"], values["redis"]["port"]))
    if values["s3"]["minio"]["enabled"]:
        rules.append({"to": bundled("minio"), "ports": tcp(9000)})
    else:
        rules.append(external(np["s3Egress"], int(values["s3"]["endpoint"].rsplit(":", 1)[1])))
    return rules


def external(egress: dict[str, Any], port: int) -> dict[str, Any]:
    to = [{"ipBlock": {"cidr": c}} for c in egress["cidrs"]] + egress["peers"]
    rule: dict[str, Any] = {"ports": tcp(*(egress["ports"] or [port]))}
    if to:
        rule["to"] = to
    return rule


def api_rule(values: dict[str, Any]) -> dict[str, Any]:
    api = values["networkPolicy"]["apiServer"]
    rule: dict[str, Any] = {"ports": tcp(*api["ports"])}
    if api["cidrs"]:
        rule["to"] = [{"ipBlock": {"cidr": c}} for c in api["cidrs"]]
    return rule


def multi_node(values: dict[str, Any]) -> bool:
    return "train" in values["run"]["stages"] and int(values["train"]["nodes"]) > 1


MODEL_STAGES = ("generate", "calibrate", "score", "train", "evaluate")


def hub_rules(values: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    """The hub egress a stage's pods get: TCP 443 for the model stages with allowHub."""
    np = values["networkPolicy"]
    if not (np.get("allowHub") and stage in MODEL_STAGES):
        return []
    rule: dict[str, Any] = {"ports": tcp(443)}
    if np["hub"]["cidrs"]:
        rule["to"] = [{"ipBlock": {"cidr": c}} for c in np["hub"]["cidrs"]]
    return [rule]


TRAIN_PEERS = {"podSelector": {"matchLabels": {**RELEASE_LABELS, "mia-dpo.io/stage": "train"}}}


def _values(tmp_path: Path, values: dict[str, Any], name: str = "v.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


EXTERNAL_PLAIN = {
    "redis": {"enabled": False, "host": "redis.example", "password": "pw"},
    "s3": {"minio": {"enabled": False}, "endpoint": "s3.example:9443", "accessKey": "a",
           "secretKey": "b"},
}  # fmt: skip

# --------------------------------------------------------------------------- tests


def test_every_pod_is_fenced_in(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    all_pods = pods(r, values["run"]["id"] or RELEASE)
    assert {f"stage/{s}" for s in STAGES} <= set(all_pods)
    assert f"{RELEASE}-controller" in all_pods and f"{RELEASE}-test" in all_pods
    for where, labels in all_pods.items():
        policies = policies_for(r, labels)
        assert policies, f"{where} is selected by no NetworkPolicy"
        types = {t for p in policies for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, where


def test_one_role_policy_per_pod(rendered: dict[str, Rendered], scenario: str) -> None:
    """Each pod gets its own role's policy and no other's (train peers add to workers)."""
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    for where, labels in pods(r, values["run"]["id"] or RELEASE).items():
        names = sorted(p["metadata"]["name"] for p in policies_for(r, labels))
        if where.startswith("stage/"):
            extra = ["mia-dpo-train"] if where == "stage/train" and multi_node(values) else []
            if hub_rules(values, where.removeprefix("stage/")):
                extra.append("mia-dpo-hub")
            assert names == sorted(["mia-dpo-workers", *extra]), where
        else:
            role = where.removeprefix(f"{RELEASE}-")
            assert names == [f"mia-dpo-{role}"], where


def test_worker_egress_is_dns_redis_s3(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    expected = service_rules(values)
    for stage in STAGES:
        labels = pods(r, values["run"]["id"] or RELEASE)[f"stage/{stage}"]
        peers = [{"to": [TRAIN_PEERS]}] if stage == "train" and multi_node(values) else []
        got = egress_of(r, labels)
        assert same_rules(got, expected + peers + hub_rules(values, stage)), (stage, got)


def test_default_rules(rendered: dict[str, Rendered]) -> None:
    """The default egress, spelled out: kube-dns on 53, the bundled Redis and MinIO pods."""
    r = rendered["default"]
    labels = pods(r, "llava-665k")["stage/generate"]
    assert same_rules(egress_of(r, labels), [
        {"to": DNS_TO, "ports": DNS_PORTS},
        {"to": bundled("redis"), "ports": tcp(6379)},
        {"to": bundled("minio"), "ports": tcp(9000)},
    ])  # fmt: skip


def test_egress_targets_are_the_bundled_pods(rendered: dict[str, Rendered]) -> None:
    """The Redis / MinIO egress selectors pick exactly the bundled Deployment's pods."""
    r = rendered["default"]
    all_pods = pods(r, "llava-665k")
    for component, port in (("redis", 6379), ("minio", 9000)):
        (rule,) = [x for x in egress_of(r, all_pods["stage/augment"]) if x["ports"] == tcp(port)]
        (peer,) = rule["to"]
        hits = [w for w, labels in all_pods.items() if selects(peer["podSelector"], labels)]
        assert hits == [f"{RELEASE}-{component}"], component


def test_only_the_controller_reaches_the_api_server(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    api = api_rule(values)
    holders = [p["metadata"]["name"] for p in r.kind("NetworkPolicy")
               if key(api) in map(key, p["spec"].get("egress") or [])]  # fmt: skip
    assert holders == ["mia-dpo-controller"]
    controller = pods(r, values["run"]["id"] or RELEASE)[f"{RELEASE}-controller"]
    expected = [*service_rules(values), api, *values["networkPolicy"]["extraEgress"]]
    assert same_rules(egress_of(r, controller), expected)
    if scenario != "external-services":  # there S3 itself listens on 443
        for p in r.kind("NetworkPolicy"):
            if p["metadata"]["name"] in ("mia-dpo-controller", "mia-dpo-hub"):
                continue
            ports = {pp.get("port") for rule in p["spec"].get("egress") or []
                     for pp in rule.get("ports") or []}  # fmt: skip
            assert not ports & API_PORTS, p["metadata"]["name"]


def test_api_server_defaults() -> None:
    values = values_for()
    assert values["networkPolicy"]["apiServer"] == {"cidrs": [], "ports": [443, 6443]}
    assert api_rule(values) == {"ports": tcp(443, 6443)}  # any address: narrow it


def test_no_ingress_to_workers_controller_and_test(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    for where, labels in pods(r, values["run"]["id"] or RELEASE).items():
        if where.endswith(("-redis", "-minio")):
            continue
        ingress = ingress_of(r, labels)
        if where == "stage/train" and multi_node(values):
            assert ingress == [{"from": [TRAIN_PEERS]}], where
        else:
            assert ingress == [], where


def test_train_peers(rendered: dict[str, Rendered]) -> None:
    """Multi-node train pods talk to each other on every port (c10d rendezvous, NCCL);
    no other pod matches their peer selector."""
    r = rendered["multi-gpu"]
    all_pods = pods(r, "multi-gpu")
    policy = r.get("NetworkPolicy", "mia-dpo-train")
    spec = policy["spec"]
    assert spec["ingress"] == [{"from": [TRAIN_PEERS]}]  # no `ports`: every port
    assert spec["egress"] == [{"to": [TRAIN_PEERS]}]
    matched = [w for w, labels in all_pods.items()
               if selects(TRAIN_PEERS["podSelector"], labels)]  # fmt: skip
    assert matched == ["stage/train"]
    assert r.jobs["train"]["spec"]["completionMode"] == "Indexed"
    # single-node training (and every other scenario) gets no peer policy
    for name in ("default", "kind", "external-services"):
        assert "mia-dpo-train" not in {p["metadata"]["name"] for p in rendered[name].kind(
            "NetworkPolicy")}, name  # fmt: skip


def test_bundled_services_accept_only_release_pods(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    all_pods = pods(r, "llava-665k")
    clients = {w for w in all_pods if not w.endswith(("-redis", "-minio"))}
    assert clients == {f"stage/{s}" for s in STAGES} | {"mia-dpo-controller", "mia-dpo-test"}
    for component, port in (("redis", 6379), ("minio", 9000)):
        policy = r.get("NetworkPolicy", f"mia-dpo-{component}")
        spec = policy["spec"]
        assert selects(spec["podSelector"], all_pods[f"mia-dpo-{component}"])
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec.get("egress") in (None, [])  # it reaches nothing
        (rule,) = spec["ingress"]
        assert rule["ports"] == tcp(port)
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}  # this namespace only
        allowed = {w for w, labels in all_pods.items() if selects(peer["podSelector"], labels)}
        assert allowed == clients, component
        # another release's pods, or a stray pod, are not let in
        other = {**all_pods["mia-dpo-controller"], "app.kubernetes.io/instance": "other"}
        assert not selects(peer["podSelector"], other)
        assert not selects(peer["podSelector"], {"app": "debug"})


def test_helm_test_pod_reaches_redis_and_s3(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    all_pods = pods(r, values["run"]["id"] or RELEASE)
    test_pod = all_pods[f"{RELEASE}-test"]
    assert same_rules(egress_of(r, test_pod), service_rules(values))
    for component in ("redis", "minio"):
        name = f"{RELEASE}-{component}"
        if name in all_pods:
            peers = [peer for rule in ingress_of(r, all_pods[name]) for peer in rule["from"]]
            assert any(selects(peer["podSelector"], test_pod) for peer in peers), name


def test_external_services_use_configured_peers(rendered: dict[str, Rendered]) -> None:
    r = rendered["external-services"]
    names = sorted(p["metadata"]["name"] for p in r.kind("NetworkPolicy"))
    assert names == ["mia-dpo-controller", "mia-dpo-test", "mia-dpo-workers"]
    labels = pods(r, "llava-7b-v1")["stage/generate"]
    assert same_rules(egress_of(r, labels), [
        {"to": DNS_TO, "ports": DNS_PORTS},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis",
                                                 "app.kubernetes.io/component": "master"}}}],
         "ports": tcp(6380)},
        {"to": [{"ipBlock": {"cidr": "52.218.0.0/17"}}, {"ipBlock": {"cidr": "3.5.64.0/21"}}],
         "ports": tcp(443)},
    ])  # fmt: skip
    controller = pods(r, "llava-7b-v1")["mia-dpo-controller"]
    api = [x for x in egress_of(r, controller) if x not in egress_of(r, labels)]
    assert api == [{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": tcp(443)}]


def test_external_without_addresses_opens_only_the_ports(tmp_path: Path) -> None:
    r = render(_values(tmp_path, EXTERNAL_PLAIN))
    labels = pods(r, RELEASE)["stage/score"]
    assert same_rules(egress_of(r, labels), [
        {"to": DNS_TO, "ports": DNS_PORTS},
        {"ports": tcp(6379)},  # redis.port, any address
        {"ports": tcp(9443)},  # the port of s3.endpoint, any address
    ])  # fmt: skip
    # explicit ports win over the configured ones (a Service's targetPort)
    over = {**EXTERNAL_PLAIN, "networkPolicy": {"redisEgress": {"cidrs": ["10.1.2.0/24"],
                                                                "ports": [7000]},
                                                "s3Egress": {"ports": [443, 8443]}}}  # fmt: skip
    r = render(_values(tmp_path, over, "over.yaml"))
    labels = pods(r, RELEASE)["stage/score"]
    assert same_rules(egress_of(r, labels), [
        {"to": DNS_TO, "ports": DNS_PORTS},
        {"to": [{"ipBlock": {"cidr": "10.1.2.0/24"}}], "ports": tcp(7000)},
        {"ports": tcp(443, 8443)},
    ])  # fmt: skip


def test_extra_egress_and_dns(tmp_path: Path) -> None:
    hub = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
           "ports": [{"protocol": "TCP", "port": 443}]}  # fmt: skip
    local_dns = {"ipBlock": {"cidr": "169.254.20.10/32"}}
    values = {"networkPolicy": {"extraEgress": [hub], "dns": {"to": [*DNS_TO, local_dns]}}}
    r = render(_values(tmp_path, values))
    all_pods = pods(r, RELEASE)
    dns = {"to": [*DNS_TO, local_dns], "ports": DNS_PORTS}
    for where in ("stage/generate", "stage/train", "mia-dpo-controller"):
        rules = egress_of(r, all_pods[where])
        assert key(hub) in map(key, rules), where
        assert key(dns) in map(key, rules), where
    for where in ("mia-dpo-test", "mia-dpo-redis", "mia-dpo-minio"):
        assert key(hub) not in map(key, egress_of(r, all_pods[where])), where


@pytest.mark.parametrize("cidrs", [[], ["18.160.0.0/15", "2600:9000::/28"]])
def test_allow_hub_opens_443_to_the_model_stages_only(tmp_path: Path, cidrs: list[str]) -> None:
    values = {"networkPolicy": {"allowHub": True, "hub": {"cidrs": cidrs}},
              "config": {"score": {"layer": "auto"}}}  # fmt: skip
    r = render(_values(tmp_path, values))
    all_pods = pods(r, RELEASE)
    assert "stage/calibrate" in all_pods
    (rule,) = hub_rules(values_for(_values(tmp_path, values, "again.yaml")), "generate")
    assert rule == ({"ports": tcp(443), "to": [{"ipBlock": {"cidr": c}} for c in cidrs]}
                    if cidrs else {"ports": tcp(443)})  # fmt: skip
    for where, labels in all_pods.items():
        model = where.removeprefix("stage/") in MODEL_STAGES
        assert (key(rule) in map(key, egress_of(r, labels))) == model, where
    hub = r.get("NetworkPolicy", "mia-dpo-hub")
    assert hub["spec"]["policyTypes"] == ["Egress"] and "ingress" not in hub["spec"]
    # off by default: no pod reaches 443 but the controller (the API server)
    assert values_for()["networkPolicy"]["allowHub"] is False
    assert "mia-dpo-hub" not in {p["metadata"]["name"] for p in render().kind("NetworkPolicy")}


def test_disabled_renders_none(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    r = render(_values(tmp_path, {"networkPolicy": {"enabled": False}}))
    assert r.kind("NetworkPolicy") == []
    names = sorted((o["kind"], o["metadata"]["name"]) for o in r.objects)
    enabled = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["default"].objects
                     if o["kind"] != "NetworkPolicy")  # fmt: skip
    assert names == enabled
    assert values_for()["networkPolicy"]["enabled"] is True  # on by default


def test_policies_validate_strict(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """kubernetes-validate --strict (1.33) on the NetworkPolicies of every variant."""
    variants = {name: r for name, r in rendered.items()}
    variants["external-plain"] = render(_values(tmp_path, EXTERNAL_PLAIN))
    hub = [{"ports": [{"protocol": "TCP", "port": 443}]}]
    variants["extra"] = render(_values(tmp_path, {"networkPolicy": {
        "extraEgress": hub, "apiServer": {"cidrs": ["172.18.0.2/32", "fd00::1/128"]},
        "dns": {"to": [{"ipBlock": {"cidr": "169.254.20.10/32"}}]}}}, "extra.yaml"))  # fmt: skip
    variants["hub"] = render(_values(tmp_path, {"networkPolicy": {
        "allowHub": True, "hub": {"cidrs": ["18.160.0.0/15"]}}}, "hub.yaml"))  # fmt: skip
    files = []
    for name, r in variants.items():
        policies = r.kind("NetworkPolicy")
        assert policies, name
        path = tmp_path / f"{name}-netpol.yaml"
        path.write_text(yaml.safe_dump_all(policies))
        files.append(str(path))
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.33.0", "--quiet", *files],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_long_release_name_fits() -> None:
    r = render(release="r" * 53)
    for p in r.kind("NetworkPolicy"):
        assert len(p["metadata"]["name"]) <= 63, p["metadata"]["name"]


BAD = [
    ("unknown key", {"networkPolicy": {"egress": []}}, "Additional property egress"),
    ("bad cidr", {"networkPolicy": {"s3Egress": {"cidrs": ["10.0.0.0"]}}},
     "networkPolicy.s3Egress.cidrs.0"),
    ("port out of range", {"networkPolicy": {"apiServer": {"ports": [70000]}}},
     "networkPolicy.apiServer.ports.0"),
    ("unknown peer key", {"networkPolicy": {"redisEgress": {"peers": [{"pods": {}}]}}},
     "networkPolicy.redisEgress.peers.0"),
    ("bad protocol", {"networkPolicy": {"dns": {"ports": [{"protocol": "ICMP", "port": 53}]}}},
     "networkPolicy.dns.ports.0.protocol"),
    ("enabled not a bool", {"networkPolicy": {"enabled": "yes"}}, "networkPolicy.enabled"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_values_are_refused(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    proc = template(_values(tmp_path, values))
    assert proc.returncode != 0, f"accepted: {values}"
    assert message in proc.stderr, proc.stderr
