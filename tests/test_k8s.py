"""deploy/k8s: every manifest is valid against the Kubernetes schemas, and says what the service needs.

kubernetes-validate carries the schemas (offline); strict mode refuses unknown fields,
so a misspelt key (``readinesProbe``) fails here instead of being ignored by the cluster.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"


def _manifests() -> dict[str, list[dict[str, Any]]]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


MANIFESTS = _manifests()
RESOURCES = [doc for docs in MANIFESTS.values() for doc in docs]
# Argo Rollouts' kinds (the gateway's Rollout and AnalysisTemplate) are not Kubernetes'
# own: tests/test_rollout.py checks them against their CRDs' schemas.
CORE_RESOURCES = [r for r in RESOURCES if not r["apiVersion"].startswith("argoproj.io/")]


def _one(kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}"
    return matches[0]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for r in RESOURCES:
        if r["kind"] == "Deployment":
            specs.append((r["metadata"]["name"], r["spec"]["template"]["spec"]))
        elif r["kind"] == "CronJob":
            specs.append((r["metadata"]["name"], r["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize(
    "resource", CORE_RESOURCES, ids=[f"{r['kind']}/{r['metadata']['name']}" for r in CORE_RESOURCES]
)
def test_manifest_is_valid_for_kubernetes(resource):
    assert kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field():
    broken = copy.deepcopy(_one("Deployment", "marketdata-gateway"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)


def test_gateway_probes_command_and_autoscaler():
    deployment = _one("Deployment", "marketdata-gateway")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
        # The kubelet would send the pod IP as Host, which ALLOWED_HOSTS refuses.
        host = {h["name"]: h["value"] for h in container[probe]["httpGet"]["httpHeaders"]}["Host"]
        allowed = _one("ConfigMap", "marketdata-config")["data"]["DJANGO_ALLOWED_HOSTS"].split(",")
        assert host in allowed
    # The image's own command, as the Dockerfile has it.
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert cmd
    assert container["command"] == json.loads(cmd.group(1))
    assert container["command"] == [
        "python", "-m", "streaming.server", "-b", "0.0.0.0", "-p", "8000", "config.asgi:application"  # noqa: S104
    ]  # fmt: skip
    assert ports["http"] == 8000

    # The Rollout (gateway-rollout.yaml) runs this template: the autoscaler scales it.
    hpa = _one("HorizontalPodAutoscaler", "marketdata-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "name": "marketdata-gateway",
    }
    assert hpa["spec"]["metrics"][0] == {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}},
    }
    assert container["resources"]["requests"]["cpu"]  # utilisation is measured against the request


def test_gateway_service_and_sticky_websocket_friendly_ingress():
    deployment = _one("Deployment", "marketdata-gateway")
    service = _one("Service", "marketdata-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ingress = _one("Ingress", "marketdata-gateway")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert notes["nginx.ingress.kubernetes.io/session-cookie-name"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    backends = [p["backend"]["service"]["name"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert backends == ["marketdata-gateway"]


def test_one_ingester_per_feed_recreated_never_two_at_once():
    ingesters = [
        r
        for r in RESOURCES
        if r["kind"] == "Deployment" and r["metadata"]["labels"]["app.kubernetes.io/component"] == "ingester"
    ]
    assert ingesters
    feeds = []
    for deployment in ingesters:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:4] == ["python", "manage.py", "ingest", "live"]
        feeds.append((command[command.index("--dataset") + 1], command[command.index("--schema") + 1]))
    assert len(feeds) == len(set(feeds))


def test_retention_cronjob_runs_retention_apply():
    cron = _one("CronJob", "marketdata-retention")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "manage.py", "retention_apply"]


# Which database role each component connects as (marketdata/roles.py).
ROLE_OF = {
    "marketdata-gateway": "DATABASE_URL_GATEWAY",
    "marketdata-admin": "DATABASE_URL_OWNER",
    "marketdata-retention": "DATABASE_URL_WRITER",
}


@pytest.mark.parametrize(("name", "spec"), _pod_specs(), ids=[name for name, _ in _pod_specs()])
def test_pods_run_non_root_with_limits_and_the_least_database_role(name, spec):
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user `app`
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
        assert container["image"].startswith("marketdata-gateway")
    database = _env(spec["containers"][0])["DATABASE_URL"]["secretKeyRef"]["key"]
    assert database == ROLE_OF.get(name, "DATABASE_URL_WRITER")  # ingesters: the writer


def test_every_secret_and_config_reference_exists_and_placeholders_are_marked():
    secret = _one("Secret", "marketdata-secrets")
    config = _one("ConfigMap", "marketdata-config")
    for name, spec in _pod_specs():
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for ref in container.get("envFrom", []):
                assert ref["configMapRef"]["name"] == config["metadata"]["name"]
            for value in _env(container).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    assert value["secretKeyRef"]["name"] == secret["metadata"]["name"]
                    assert value["secretKeyRef"]["key"] in secret["stringData"], name
    for key, value in secret["stringData"].items():
        assert value == "" or "CHANGE-ME" in value, key


# -- metrics access (METRICS_TOKEN) and the Prometheus that scrapes with it ------------------

PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def _serves_metrics(container: dict[str, Any]) -> str | None:
    """The name of the container's port that serves /metrics: the server's `http`, an ingester's `metrics`."""
    if container["command"][:3] == ["python", "-m", "streaming.server"]:
        return "http"
    if "INGEST_METRICS_PORT" in _env(container):
        return "metrics"
    return None


def test_every_metrics_endpoint_requires_the_token_from_the_secret():
    secret = _one("Secret", "marketdata-secrets")
    assert "CHANGE-ME" in secret["stringData"]["METRICS_TOKEN"]
    serving = []
    for resource in RESOURCES:
        if resource["kind"] != "Deployment":
            continue
        for container in resource["spec"]["template"]["spec"]["containers"]:
            port = _serves_metrics(container)
            if port is None:
                continue
            serving.append(resource["metadata"]["labels"]["app.kubernetes.io/component"])
            assert port in {p["name"] for p in container["ports"]}
            token = _env(container)["METRICS_TOKEN"]
            assert token == {"secretKeyRef": {"name": "marketdata-secrets", "key": "METRICS_TOKEN"}}
    assert {"gateway", "admin", "ingester"} <= set(serving)
    assert "METRICS_PUBLIC" not in _one("ConfigMap", "marketdata-config")["data"]  # never opened for all


def test_prometheus_scrapes_every_metrics_port_with_the_bearer_token():
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    kept: dict[str, set[str]] = {}
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"]["type"] == "Bearer"
        assert job["authorization"]["credentials_file"].startswith("/etc/prometheus/secrets/")
        assert "credentials" not in job["authorization"]  # never the token itself in the file
        keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
        assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == "marketdata"
        port = keep["__meta_kubernetes_pod_container_port_name"]
        for component in keep["__meta_kubernetes_pod_label_app_kubernetes_io_component"].split("|"):
            kept.setdefault(component, set()).add(port)
    # Every pod that serves metrics is scraped, on the port that serves them.
    for resource in RESOURCES:
        if resource["kind"] == "Deployment":
            component = resource["metadata"]["labels"]["app.kubernetes.io/component"]
            for container in resource["spec"]["template"]["spec"]["containers"]:
                port = _serves_metrics(container)
                if port is not None:
                    assert port in kept.get(component, set()), component


def test_compose_requires_the_token_and_its_prometheus_sends_it():
    services = COMPOSE["services"]
    for name in ("gateway", "ingester"):
        assert services[name]["environment"]["METRICS_TOKEN"].startswith("${METRICS_TOKEN:?")
    assert COMPOSE["secrets"]["metrics_token"] == {"environment": "METRICS_TOKEN"}
    prometheus = services["prometheus"]
    assert prometheus["secrets"] == ["metrics_token"]
    source, target = prometheus["volumes"][0].split(":")[:2]
    assert target == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / source).read_text())
    targets = {}
    for job in config["scrape_configs"]:
        assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
        targets[job["job_name"]] = job["static_configs"][0]["targets"]
    assert targets["marketdata-gateway"] == ["gateway:8000"]
    assert targets["marketdata-ingester"] == [f"ingester:{services['ingester']['environment']['INGEST_METRICS_PORT']}"]


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    grafana = COMPOSE["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provisioning = ROOT / next(s for s, t in mounts.items() if t == "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "marketdata.yml").read_text())["providers"]
    dashboards = {t: s for s, t in mounts.items()}
    assert f"{provider['options']['path']}/marketdata.json" in dashboards
    assert json.loads((ROOT / dashboards[f"{provider['options']['path']}/marketdata.json"]).read_text())["panels"]
