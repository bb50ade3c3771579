"""The delivery pipeline (.github/workflows/ci.yml) and the image it builds, checked offline.

check-jsonschema carries GitHub's workflow schema (``vendor.github-workflows``), so a
misspelt key or a job without ``runs-on`` fails here, before GitHub refuses the file.
The rest says what the pipeline must do: run the README's test command against the
service containers the scripts expect, scan the image and push it, from main only, under
its commit SHA.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW_PATH = ROOT / ".github" / "workflows" / "ci.yml"
SAMPLES_LIST = ROOT / ".github" / "databento-samples.sha256"
# The jobs' own schema checks: GitHub's, and check-jsonschema's rule that every job has a
# timeout (a hung job would otherwise hold a runner for 6 hours).
SCHEMAS = ("vendor.github-workflows", "custom.github-workflows-require-timeout")
ON_MAIN = "github.event_name == 'push' && github.ref == 'refs/heads/main'"


def _load(path: Path) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub and the schema read it as "on".
    data = yaml.safe_load(path.read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


WORKFLOW = _load(WORKFLOW_PATH)
JOBS: dict[str, dict[str, Any]] = WORKFLOW["jobs"]


def _schema_errors(path: Path) -> str:
    """Run check-jsonschema on a workflow file; '' when every schema accepts it."""
    found = []
    for schema in SCHEMAS:
        done = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            found.append(done.stdout + done.stderr)
    return "\n".join(found)


def _dump(workflow: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    return path


def _steps(job: str) -> list[dict[str, Any]]:
    return JOBS[job]["steps"]


def _step(job: str, uses: str) -> dict[str, Any]:
    (found,) = [s for s in _steps(job) if s.get("uses", "").startswith(uses + "@")]
    return found


def test_the_workflow_is_valid_for_github():
    assert _schema_errors(WORKFLOW_PATH) == ""


@pytest.mark.parametrize(
    ("name", "breakage"),
    [
        ("runs-on misspelt", lambda w: w["jobs"]["test"].update({"runs_on": w["jobs"]["test"].pop("runs-on")})),
        ("a step both runs and uses", lambda w: w["jobs"]["lint"]["steps"][0].update({"run": "true"})),
        ("an unknown trigger", lambda w: w["on"].update({"pushed": None})),
        ("a job without a timeout", lambda w: w["jobs"]["image"].pop("timeout-minutes")),
    ],
)
def test_a_broken_copy_of_the_workflow_is_rejected(tmp_path, name, breakage):
    broken = copy.deepcopy(WORKFLOW)
    breakage(broken)
    assert _schema_errors(_dump(broken, tmp_path / "ci.yml")) != "", name
    # The same file unbroken passes: it is the change that was caught, not the dump.
    assert _schema_errors(_dump(WORKFLOW, tmp_path / "ci-ok.yml")) == ""


def test_it_runs_on_every_push_and_pull_request():
    assert set(WORKFLOW["on"]) == {"push", "pull_request"}
    assert WORKFLOW["on"]["push"] is None  # every branch
    assert WORKFLOW["on"]["pull_request"] is None
    assert WORKFLOW["permissions"] == {"contents": "read"}


def test_every_action_is_pinned_to_an_exact_version():
    pinned = re.compile(r"^[\w.-]+/[\w./-]+@(v\d+\.\d+\.\d+|[0-9a-f]{40})$")
    uses = [s["uses"] for job in JOBS.values() for s in job["steps"] if "uses" in s]
    assert uses
    for ref in uses:
        assert pinned.match(ref), ref
    # Trivy's tags without a `v` were rewritten to a malicious commit in March 2026 and deleted.
    assert _step("image", "aquasecurity/trivy-action")["uses"].split("@")[1].startswith("v")


def test_jobs_and_steps_refer_only_to_what_exists():
    for name, job in JOBS.items():
        for need in job.get("needs", []):
            assert need in JOBS, name
        ids = {s["id"] for s in job["steps"] if "id" in s}
        text = yaml.safe_dump(job)
        for step_id in re.findall(r"steps\.([\w-]+)\.outputs", text):
            assert step_id in ids, (name, step_id)


def test_lint_job_runs_the_lint_target():
    assert [s["run"] for s in _steps("lint") if "run" in s] == ["make lint"]
    makefile = (ROOT / "Makefile").read_text()
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert lint
    assert lint.group(1).split() == [
        "$(BIN)/ruff",
        "check",
        ".",
        "$(BIN)/ruff",
        "format",
        "--check",
        ".",
        "$(BIN)/mypy",
        ".",
    ]


def _port(url: str) -> str:
    match = re.search(r":(\d+)/", url)
    assert match, url
    return match.group(1)


def test_test_job_runs_make_test_against_the_service_containers():
    job = JOBS["test"]
    assert [s["run"] for s in job["steps"] if s.get("name") == "make test"] == ["make test"]
    services = job["services"]
    env = job["env"]
    host_port = {name: s["ports"][0].split(":")[0] for name, s in services.items()}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"] == "redis:7"
    assert _port(env["DATABASE_URL"]) == host_port["postgres"] == "5432"
    assert _port(env["REDIS_URL"]) == host_port["redis"]
    # scripts/timescaledb.sh uses the server at TIMESCALEDB_DATABASE_URL as it is (step 0),
    # so the TimescaleDB run tests the container, of the version the script would build.
    assert _port(env["TIMESCALEDB_DATABASE_URL"]) == host_port["timescaledb"]
    version = re.search(r'^VERSION="([\d.]+)"$', (ROOT / "scripts" / "timescaledb.sh").read_text(), re.MULTILINE)
    assert version
    assert services["timescaledb"]["image"] == f"timescale/timescaledb:{version.group(1)}-pg15"
    for name in ("postgres", "timescaledb"):
        # The tests connect as roles they create, by URLs without passwords (as on the machine).
        assert services[name]["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
        assert services[name]["env"]["POSTGRES_USER"] == "root"
        assert "--health-cmd" in services[name]["options"]
    assert "TIMESCALEDB_TESTS" not in env  # both storage paths run
    node = _step("test", "actions/setup-node")["with"]["node-version"]
    assert node == "${{ env.NODE_VERSION }}"
    assert int(WORKFLOW["env"]["NODE_VERSION"]) >= 18  # README: Node.js >= 18 for `make assets`
    assert WORKFLOW["env"]["PYTHON_VERSION"] == "3.11"


def test_image_job_builds_scans_and_pushes_only_from_main_under_the_commit_sha():
    job = JOBS["image"]
    assert set(job["needs"]) == {"lint", "test"}  # never an image of a red commit
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    ref_step = next(s for s in job["steps"] if s.get("id") == "image")
    assert "ghcr.io/${GITHUB_REPOSITORY_OWNER,,}/marketdata-gateway:${GITHUB_SHA}" in ref_step["run"]
    build = _step("image", "docker/build-push-action")["with"]
    assert build["context"] == "."  # the repository's Dockerfile
    assert build["push"] is False
    assert build["load"] is True
    assert build["tags"] == "${{ steps.image.outputs.ref }}"
    scan = _step("image", "aquasecurity/trivy-action")["with"]
    assert scan["image-ref"] == build["tags"]
    assert scan["severity"] == "CRITICAL"
    assert scan["exit-code"] == "1"
    names = [s.get("name", s.get("uses")) for s in job["steps"]]
    assert names.index("Build") < names.index("Scan (Trivy; a CRITICAL finding fails the job)") < names.index("Push")
    for step in job["steps"][names.index("Log in to ghcr.io") :]:
        assert step["if"] == ON_MAIN
    push = next(s for s in job["steps"] if s.get("name") == "Push")
    assert push["run"] == 'docker push "$IMAGE"'
    assert push["env"]["IMAGE"] == build["tags"]
    assert "latest" not in WORKFLOW_PATH.read_text()


def test_kustomization_deploys_the_image_the_pipeline_pushes():
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert image["name"] == "marketdata-gateway"
    assert re.fullmatch(r"ghcr\.io/[^/]+/marketdata-gateway", image["newName"])
    assert image["newTag"] != "latest"


def test_dockerfile_is_multi_stage_slim_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.MULTILINE)
    assert [name for _, name in stages] == ["builder", "assets", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "build-essential" not in runtime  # the compiler stays in the builder
    users = re.findall(r"^USER (\S+)$", runtime, re.MULTILINE)
    assert users == ["app"]
    assert re.search(r"useradd --system --uid 10001 .* app$", runtime, re.MULTILINE)
    assert runtime.index("USER app") < runtime.index("\nCMD ")
    # The image gets the page's npm packages, not the test-only schemas (devDependencies).
    assert "npm ci --omit=dev" in text
    assert ".github" in (ROOT / ".dockerignore").read_text().split()


# -- The Databento samples the test job fetches ------------------------------------------


def _listed() -> dict[str, str]:
    lines = [line.split() for line in SAMPLES_LIST.read_text().splitlines() if not line.startswith("#")]
    return {path: digest for digest, path in lines}


def _samples_step() -> dict[str, Any]:
    (step,) = [s for s in _steps("test") if s.get("name", "").startswith("Databento samples into")]
    return step


def test_the_samples_list_is_the_samples_the_tests_read(samples):
    import hashlib

    on_disk = {
        str(p.relative_to(samples)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in samples.rglob("*")
        if p.is_file() and p.name != "SOURCE.md"
    }
    assert _listed() == on_disk


def test_the_samples_come_from_the_commits_their_source_names(samples):
    source = samples / "SOURCE.md"
    if not source.is_file():
        pytest.skip(f"{source} is not there to compare with")
    commits = set(re.findall(r"`([0-9a-f]{40})`", source.read_text()))
    checkouts = [s["with"] for s in _steps("test") if s.get("with", {}).get("repository", "").startswith("databento/")]
    assert {c["ref"] for c in checkouts} == commits
    assert {c["repository"] for c in checkouts} == {"databento/databento-python", "databento/dbn"}


def _origin_layout(workspace: Path, samples: Path) -> None:
    """What the two checkouts give: each sample at its path in its origin repository."""
    for path in _listed():
        if path.startswith("dbn-repo/"):
            target = workspace / "origin" / "dbn" / "tests" / "data" / path.removeprefix("dbn-repo/")
        else:
            target = workspace / "origin" / "databento-python" / "tests" / "data" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples / path, target)
    checkout = workspace / "marketdata" / ".github"
    checkout.mkdir(parents=True)
    shutil.copyfile(SAMPLES_LIST, checkout / SAMPLES_LIST.name)


def _run_samples_step(workspace: Path) -> subprocess.CompletedProcess[str]:
    # As GitHub runs a `run:` step: bash -e -o pipefail, in the job's working directory.
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", _samples_step()["run"]],
        cwd=workspace / JOBS["test"]["defaults"]["run"]["working-directory"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_samples_step_lays_them_out_where_the_tests_look(tmp_path, samples):
    _origin_layout(tmp_path, samples)
    done = _run_samples_step(tmp_path)
    assert done.returncode == 0, done.stderr
    # ../shared/data/databento beside the checkout: tests/conftest.py's second place.
    laid = tmp_path / "shared" / "data" / "databento"
    for path in _listed():
        assert (laid / path).read_bytes() == (samples / path).read_bytes()


def test_the_samples_step_fails_on_a_changed_file(tmp_path, samples):
    _origin_layout(tmp_path, samples)
    changed = tmp_path / "origin" / "dbn" / "tests" / "data" / "test_data.trades.dbn"
    changed.write_bytes(changed.read_bytes() + b"\0")
    done = _run_samples_step(tmp_path)
    assert done.returncode != 0
    assert "dbn-repo/test_data.trades.dbn: FAILED" in done.stdout + done.stderr
