"""Progressive delivery of the gateway, checked offline: the Argo Rollouts canary and its
analysis, the Argo CD Application, the autoscaler's latency metric and the
prometheus-adapter rule that serves it.

The Argo kinds are validated against their CRDs' schemas (tests/k8s_crds.mjs, with the
schemas that @kubernetes-models ships on npm); the structural tests below check what those
schemas cannot: that the queries ask for metrics the gateway exports (ops/metrics.py) by
labels its scrape gives them (deploy/prometheus/prometheus.yml), and that the names which
tie the files together agree.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops import metrics
from tests.ops.test_dashboard import exposed_names, metric_names
from tests.test_k8s import RESOURCES

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = yaml.safe_load((ROOT / "deploy" / "argocd" / "application.yaml").read_text())
ADAPTER = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
VALIDATOR = ROOT / "tests" / "k8s_crds.mjs"
SCHEMA_PACKAGES = [ROOT / "node_modules" / "@kubernetes-models" / name for name in ("argo-rollouts", "argo-cd")]
GATEWAY = "marketdata-gateway"


def _one(kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}"
    return matches[0]


ROLLOUT = _one("Rollout", GATEWAY)
CANARY = ROLLOUT["spec"]["strategy"]["canary"]
ARGO_RESOURCES = [r for r in RESOURCES if r["apiVersion"].startswith("argoproj.io/")] + [APPLICATION]


# -- against the CRDs' schemas ------------------------------------------------------------


def _crd_errors(resources: list[dict[str, Any]]) -> list[str | None]:
    node = shutil.which("node")
    missing = [str(p) for p in SCHEMA_PACKAGES if not p.is_dir()]
    if node is None or missing:
        pytest.skip(f"needs Node.js and `make assets` (npm ci: {', '.join(missing) or 'node'})")
    done = subprocess.run(
        [node, str(VALIDATOR)], input=json.dumps(resources), capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "resource", ARGO_RESOURCES, ids=[f"{r['kind']}/{r['metadata']['name']}" for r in ARGO_RESOURCES]
)
def test_argo_resource_is_valid_for_its_crd(resource):
    assert _crd_errors([resource]) == [None]


def test_the_crd_validator_refuses_broken_copies():
    rollout = copy.deepcopy(ROLLOUT)
    rollout["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = "20"
    template = copy.deepcopy(_one("AnalysisTemplate", "marketdata-gateway-canary"))
    template["spec"]["metrics"][0]["provider"]["prometheus"]["query"] = ["not", "a", "string"]
    application = copy.deepcopy(APPLICATION)
    del application["spec"]["destination"]
    unknown = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rolout", "metadata": {"name": "x"}}
    errors = _crd_errors([rollout, template, application, unknown])
    assert "steps/0/setWeight must be integer" in str(errors[0])
    assert "prometheus/query must be string" in str(errors[1])
    assert "must have required property destination" in str(errors[2])
    assert errors[3] == "no schema for argoproj.io/v1alpha1 Rolout"


# -- the Rollout --------------------------------------------------------------------------


def test_rollout_runs_the_gateway_deployment_and_the_autoscaler_sets_its_replicas():
    ref = ROLLOUT["spec"]["workloadRef"]
    deployment = _one(ref["kind"], ref["name"])
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", GATEWAY)
    assert ref["scaleDown"] == "progressively"  # the Deployment's pods leave as the Rollout's come
    assert ROLLOUT["spec"]["selector"] == deployment["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert ROLLOUT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Replicas are the autoscaler's: a number in git would be set back at every Argo CD sync.
    assert "replicas" not in ROLLOUT["spec"]
    assert "replicas" not in deployment["spec"]
    assert "strategy" not in deployment["spec"]  # the Rollout's strategy is the one that runs
    hpa = _one("HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": ROLLOUT["apiVersion"],
        "kind": "Rollout",
        "name": ROLLOUT["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2


def test_canary_steps_pause_at_each_weight_and_never_take_capacity_away():
    steps = CANARY["steps"]
    weights = [s["setWeight"] for s in steps if "setWeight" in s]
    assert weights == sorted(weights)
    assert 0 < weights[0] <= 25
    assert weights[-1] < 100  # the last step's pause is the last check before all pods change
    for i, step in enumerate(steps):
        if "setWeight" in step:
            pause = steps[i + 1]["pause"]
            assert re.fullmatch(r"\d+m", pause["duration"]), "a timed pause, not one that waits for a person"
    assert CANARY["maxUnavailable"] == 0
    # A canary that never becomes ready (readiness /readyz) aborts the rollout.
    assert ROLLOUT["spec"]["progressDeadlineAbort"] is True


def test_canary_analysis_runs_the_template_with_every_argument_it_needs():
    analysis = CANARY["analysis"]
    assert 0 < analysis["startingStep"] < len(CANARY["steps"])
    (ref,) = analysis["templates"]
    template = _one("AnalysisTemplate", ref["templateName"])
    given = {a["name"]: a for a in analysis["args"]}
    declared = {a["name"]: a for a in template["spec"]["args"]}
    assert {name for name, a in declared.items() if "value" not in a} == set(given)
    assert given["canary-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
    assert given["namespace"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", yaml.safe_dump(template["spec"]["metrics"])))
    assert used == set(declared)


# -- what the analysis and the adapter ask Prometheus for ---------------------------------


def _analysis_metrics() -> dict[str, dict[str, Any]]:
    template = _one("AnalysisTemplate", CANARY["analysis"]["templates"][0]["templateName"])
    return {m["name"]: m for m in template["spec"]["metrics"]}


def _gateway_target_labels() -> set[str]:
    """The labels the gateway's scrape job puts on every series (relabel_configs)."""
    (job,) = [j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "marketdata-gateway"]
    return {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}


def _matchers(query: str) -> list[tuple[str, str, str]]:
    """Every label matcher (name, operator, value) of a PromQL expression."""
    found = []
    for braces in re.findall(r"\{([^}]*)\}", re.sub(r"\{\{[^}]*\}\}", "ARG", query)):
        for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces):
            found.append((name, op, value))
    return found


def _metric_labels(sample: str) -> set[str]:
    """The labels a sample name of the registry carries (a histogram's buckets add `le`)."""
    for collector in (metrics.HTTP_REQUESTS, metrics.HTTP_LATENCY):
        family = next(iter(collector.describe()))
        if sample in {family.name + s for s in ("", "_total", "_bucket", "_count", "_sum")}:
            return set(collector._labelnames) | ({"le"} if sample.endswith("_bucket") else set())
    raise AssertionError(f"{sample} is not one of the gateway's HTTP metrics")


def _check_query(query: str) -> set[str]:
    """The metrics a query selects, after checking they exist and carry every label it matches on."""
    names = metric_names(query)
    assert names, query
    assert names <= exposed_names()
    labels = set().union(*(_metric_labels(n) for n in names)) | _gateway_target_labels()
    for name, _, _ in _matchers(query):
        assert name in labels, f"{name} is neither a label of {names} nor one the scrape sets"
    return names


def test_analysis_asks_for_the_canary_pods_error_share_and_p95_latency():
    found = _analysis_metrics()
    assert set(found) == {"error-rate", "p95-latency"}
    error_query = found["error-rate"]["provider"]["prometheus"]["query"]
    latency_query = found["p95-latency"]["provider"]["prometheus"]["query"]
    assert _check_query(error_query) == {"http_requests_total"}
    assert _check_query(latency_query) == {"http_request_duration_seconds_bucket"}
    assert "histogram_quantile(0.95," in latency_query
    assert ("status", "=", "5xx") in _matchers(error_query)
    for query in (error_query, latency_query):
        matchers = _matchers(query)
        # Only the canary's pods, of this namespace, of the gateway (not the admin, which shares the job).
        assert ("rollouts_pod_template_hash", "=", "ARG") in matchers
        assert ("namespace", "=", "ARG") in matchers
        assert ("component", "=", "gateway") in matchers
        assert ("route", "!~", "healthz|readyz|metrics") in matchers
    for metric in found.values():
        assert re.fullmatch(r"result\[0\] <= [\d.]+", metric["successCondition"])
        assert metric["failureLimit"] >= 0
        assert metric["provider"]["prometheus"]["address"] == "{{args.prometheus}}"


@pytest.mark.django_db
def test_status_label_is_the_status_class_the_analysis_counts(client):
    # The analysis counts status="5xx": the middleware labels answers by class, as this 404 shows.
    before = metrics.HTTP_REQUESTS.labels("unmatched", "GET", "4xx")._value.get()
    assert client.get("/no-such-page").status_code == 404
    assert metrics.HTTP_REQUESTS.labels("unmatched", "GET", "4xx")._value.get() == before + 1


def test_the_scrape_labels_series_by_namespace_pod_and_rollout_hash():
    labels = _gateway_target_labels()
    assert {"namespace", "pod", "component", "rollouts_pod_template_hash"} <= labels
    (job,) = [j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "marketdata-gateway"]
    sources = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"] if "target_label" in r}
    # Argo Rollouts labels a Rollout's pods `rollouts-pod-template-hash`.
    assert sources["rollouts_pod_template_hash"] == ["__meta_kubernetes_pod_label_rollouts_pod_template_hash"]
    assert sources["namespace"] == ["__meta_kubernetes_namespace"]


# -- the autoscaler and prometheus-adapter -------------------------------------------------


def test_hpa_scales_on_cpu_and_on_the_p95_latency_the_adapter_serves():
    hpa = _one("HorizontalPodAutoscaler", GATEWAY)
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(by_type) == {"Resource", "Pods"}
    assert by_type["Resource"]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 60},
    }
    pods = by_type["Pods"]["pods"]
    assert pods["target"]["type"] == "AverageValue"
    assert pods["target"]["averageValue"] == "100m"
    rules = ADAPTER["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[pods["metric"]["name"]]  # the HPA's metric is the name the rule serves
    series = re.match(r"^(\w+)\{", rule["seriesQuery"])
    assert series
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    assert series.group(1) == "http_request_duration_seconds_bucket"
    query = rule["metricsQuery"]
    assert query.startswith("histogram_quantile(0.95, sum by (<<.GroupBy>>, le)")
    assert "<<.Series>>{<<.LabelMatchers>>," in query
    # As the adapter fills the template in for the pods of one namespace.
    rendered = (
        query.replace("<<.Series>>", series.group(1))
        .replace("<<.LabelMatchers>>", 'namespace="marketdata",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert _check_query(rendered) == {"http_request_duration_seconds_bucket"}
    _check_query(rule["seriesQuery"])
    # The adapter ties series to pods by these labels, which the scrape sets.
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert set(overrides) <= _gateway_target_labels()


def test_a_renamed_metric_is_caught():
    broken = copy.deepcopy(_analysis_metrics()["p95-latency"]["provider"]["prometheus"]["query"])
    with pytest.raises(AssertionError):
        _check_query(broken.replace("http_request_duration_seconds_bucket", "http_request_latency_seconds_bucket"))
    with pytest.raises(AssertionError, match="neither a label"):
        _check_query(broken.replace('component="gateway"', 'app="gateway"'))


# -- Argo CD ------------------------------------------------------------------------------


def test_argocd_application_syncs_deploy_k8s_from_main_with_prune_and_self_heal():
    spec = APPLICATION["spec"]
    assert APPLICATION["metadata"]["namespace"] == "argocd"
    assert spec["source"]["path"] == "deploy/k8s"
    assert (ROOT / spec["source"]["path"] / "kustomization.yaml").is_file()
    assert spec["source"]["targetRevision"] == "main"
    assert spec["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    assert spec["destination"]["namespace"]
    assert "CreateNamespace=true" in spec["syncPolicy"]["syncOptions"]


def test_argocd_never_overwrites_the_secrets_values_with_the_placeholders():
    spec = APPLICATION["spec"]
    (ignored,) = spec["ignoreDifferences"]
    secret = _one("Secret", ignored["name"])
    assert (ignored["group"], ignored["kind"]) == ("", secret["kind"])
    assert set(ignored["jsonPointers"]) == {"/data", "/stringData"}
    # Without this, a sync would still apply the ignored fields.
    assert "RespectIgnoreDifferences=true" in spec["syncPolicy"]["syncOptions"]


def test_kustomize_builds_the_directory_argo_cd_syncs(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (kustomize is part of it)")
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / APPLICATION["spec"]["source"]["path"])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == {
        (r["kind"], r["metadata"]["name"]) for r in RESOURCES
    }
    images = {
        c["image"]
        for d in built
        if d["kind"] in ("Deployment", "CronJob")
        for c in (d["spec"].get("template") or d["spec"]["jobTemplate"]["spec"]["template"])["spec"]["containers"]
    }
    assert len(images) == 1
    assert images.pop().startswith("ghcr.io/")
