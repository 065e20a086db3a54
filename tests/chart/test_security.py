"""Security of what the chart renders: pod and container security contexts, credentials
only in Secrets, secret references that resolve, RBAC limited to the namespace."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    RELEASE,
    Rendered,
    containers,
    env_of,
    render,
    scenario_file,
    values_for,
    walk_keys,
)

CREDENTIAL_WORDS = ("password", "secret_key", "access_key", "secretkey", "accesskey")


def test_every_pod_is_locked_down(rendered: dict[str, Rendered], scenario: str) -> None:
    pods = list(rendered[scenario].pod_specs())
    kinds = {where.split("/")[0].split(" ")[0] for where, _ in pods}
    assert {"Job", "Pod", "template"} <= kinds
    if scenario != "external-services":
        assert "Deployment" in kinds  # the bundled Redis and MinIO
    for where, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] == 10001, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in containers(pod):
            sc = c["securityContext"]
            name = f"{where} container {c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["runAsNonRoot"] is True, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert "privileged" not in sc, name
            # a read-only root needs a writable /tmp
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
            assert "emptyDir" in volume, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where


def test_mia_dpo_pods_have_scratch(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    pods = [r.controller["spec"]["template"]["spec"]] + [
        j["spec"]["template"]["spec"] for j in r.jobs.values()
    ]
    for pod in pods:
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/scratch"]]["emptyDir"]["sizeLimit"] == "64Gi"
        assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"] == "4Gi"


# ------------------------------------------------------------------ credentials

SECRETS = {
    "redis.password": "Redis-Pw-7f3a9c",
    "s3.accessKey": "S3-Access-51be02",
    "s3.secretKey": "S3-Secret-e8d4a6c",
}


@pytest.fixture(scope="module")
def with_credentials(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    values = tmp_path_factory.mktemp("values") / "creds.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "redis": {"password": SECRETS["redis.password"]},
                "s3": {"accessKey": SECRETS["s3.accessKey"], "secretKey": SECRETS["s3.secretKey"]},
            }
        )
    )
    return render(values)


def _encodings(value: str) -> list[str]:
    return [value, base64.b64encode(value.encode()).decode()]


def test_credentials_only_in_secrets(with_credentials: Rendered) -> None:
    r = with_credentials
    assert r.secret_data() == {
        "mia-dpo-redis": {"redis-password": SECRETS["redis.password"]},
        "mia-dpo-s3": {
            "access-key": SECRETS["s3.accessKey"],
            "secret-key": SECRETS["s3.secretKey"],
        },
    }
    for o in r.objects:
        if o["kind"] == "Secret":
            continue
        text = yaml.safe_dump(o)
        for value in SECRETS.values():
            for form in _encodings(value):
                assert form not in text, f"{o['kind']}/{o['metadata']['name']} holds a credential"
    for stage, text in r.job_texts.items():
        for value in SECRETS.values():
            assert value not in text, stage


def test_no_credential_keys_in_configmap(rendered: dict[str, Rendered], scenario: str) -> None:
    cm = rendered[scenario].configmap
    config = yaml.safe_load(cm["data"]["config.yaml"])
    keys = {k.lower() for k in walk_keys(config)}
    assert not {k for k in keys if any(w in k for w in CREDENTIAL_WORDS)}, keys
    for stage, job in rendered[scenario].jobs.items():
        for c in containers(job["spec"]["template"]["spec"]):
            for e in c.get("env", []):
                if any(
                    w in e["name"].lower().replace("_", "")
                    for w in ("password", "secret", "accesskey")
                ):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (stage, e)


def test_no_plain_credential_env(rendered: dict[str, Rendered], scenario: str) -> None:
    """Every credential variable of every container comes from a secretKeyRef."""
    for where, pod in rendered[scenario].pod_specs():
        for c in containers(pod):
            for e in c.get("env", []):
                n = e["name"].upper()
                if "PASSWORD" in n or "SECRET" in n or "ACCESS_KEY" in n or "ROOT_USER" in n:
                    assert "value" not in e, (where, e)
                    assert "secretKeyRef" in e["valueFrom"], (where, e)


def test_chart_defaults_hold_no_credentials() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["redis"]["password"] == ""
    assert values["s3"]["accessKey"] == "" and values["s3"]["secretKey"] == ""
    assert not {k for k in walk_keys(values["config"]) if any(w in k for w in CREDENTIAL_WORDS)}


def test_generated_secrets_are_random(rendered: dict[str, Rendered]) -> None:
    data = rendered["default"].secret_data()
    assert len(data["mia-dpo-redis"]["redis-password"]) == 32
    assert len(data["mia-dpo-s3"]["access-key"]) == 20
    assert len(data["mia-dpo-s3"]["secret-key"]) == 40


def _secret_refs(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    refs = []
    for where, pod in r.pod_specs():
        for c in containers(pod):
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.append((f"{where} {c['name']} {e['name']}", ref))
    return refs


def test_secret_refs_resolve(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    values = values_for(scenario_file(scenario))
    secrets = r.secret_data()
    existing = {
        values["redis"]["existingSecret"]: {values["redis"]["passwordKey"]},
        values["s3"]["existingSecret"]: {
            values["s3"]["accessKeyKey"],
            values["s3"]["secretKeyKey"],
        },
    }
    if values["hfToken"]["existingSecret"]:
        existing[values["hfToken"]["existingSecret"]] = {values["hfToken"]["key"]}
    existing.pop("", None)
    refs = _secret_refs(r)
    assert refs
    for where, ref in refs:
        if ref["name"] in existing:
            assert ref["key"] in existing[ref["name"]], where
            assert ref["name"] not in secrets, "the chart must not make an existingSecret"
        else:
            assert ref["key"] in secrets[ref["name"]], where


def test_existing_secrets(rendered: dict[str, Rendered]) -> None:
    r = rendered["external-services"]
    assert not r.kind("Secret")
    for _, pod in r.pod_specs():
        for c in containers(pod):
            env = env_of(c)
            if "MIA_DPO_REDIS_PASSWORD" in env:
                ref = env["MIA_DPO_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "mia-dpo-redis-auth", "key": "password"}
                ak = env["MIA_DPO_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
                sk = env["MIA_DPO_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]
                assert ak == {"name": "mia-dpo-s3-auth", "key": "AWS_ACCESS_KEY_ID"}
                assert sk == {"name": "mia-dpo-s3-auth", "key": "AWS_SECRET_ACCESS_KEY"}


def test_bundled_services_use_the_secrets(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    redis = r.get("Deployment", "mia-dpo-redis")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mia-dpo-redis",
        "key": "redis-password",
    }
    assert "$(REDIS_PASSWORD)" in redis["args"]
    minio = r.get("Deployment", "mia-dpo-minio")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(minio)
    assert env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"]["key"] == "access-key"
    assert env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "secret-key"


def test_helm_test_pod(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    pod = r.get("Pod", "mia-dpo-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (c,) = spec["containers"]
    assert c["image"] == "ghcr.io/mia-dpo/mia-dpo:0.1.0"
    script = c["args"][0]
    assert "ping()" in script and "bucket_exists" in script
    assert "load_config" in script
    compile(script, "helm-test", "exec")
    assert set(env_of(c)) == {
        "MIA_DPO_REDIS_PASSWORD",
        "MIA_DPO_S3_ACCESS_KEY",
        "MIA_DPO_S3_SECRET_KEY",
    }


# ------------------------------------------------------------------------- RBAC

EXPECTED_RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]  # fmt: skip


def test_rbac_is_namespaced_and_minimal(rendered: dict[str, Rendered], scenario: str) -> None:
    r = rendered[scenario]
    kinds = {o["kind"] for o in r.objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    (role,) = r.kind("Role")
    assert role["rules"] == EXPECTED_RULES
    (binding,) = r.kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = r.controller["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "mia"}]
    assert r.get("ServiceAccount", sa)
    # only the controller talks to the API server
    for where, pod in r.pod_specs():
        if where != f"Job/{RELEASE}-controller":
            assert pod.get("automountServiceAccountToken") is False, where
            assert "serviceAccountName" not in pod, where


def test_rbac_can_be_left_to_the_user(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("rbac: {create: false}\nserviceAccount: {create: false, name: runner}\n")
    r = render(values)
    assert not r.kind("Role") and not r.kind("RoleBinding") and not r.kind("ServiceAccount")
    assert r.controller["spec"]["template"]["spec"]["serviceAccountName"] == "runner"
