"""deploy/: ``kubectl kustomize deploy/`` renders every manifest with the image set once;
KubeRay objects validate against the CRDs' OpenAPI v3 schemas (unknown fields rejected,
as ``kubectl apply --validate=strict`` does); core objects carry the fields the
Kubernetes API requires; every Ray process and the submitter use token authentication;
the nightly script does what it says against a stub kubectl; the Dockerfile is linted
with hadolint and checked statically (it cannot be built here); the new gauges record
without error."""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, SHARED, shared

from pipeline.cli.main import build_parser
from pipeline.config import parse_config

DEPLOY = REPO / "deploy"
CRDS = SHARED / "specs" / "kuberay"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
SECRETS = DEPLOY / "secret.example.yaml"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
COMPONENTS = {"config", "cluster", "job", "raycronjob", "cronjob", "monitoring"}
TOKEN_SECRET = {"name": "dreamshard-ray-token", "key": "auth_token"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def tool(name: str) -> str:
    """A command-line tool from the venv or PATH; skipped where missing, failed on CI."""
    found = shutil.which(
        name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed: CI must run the deploy checks")
        pytest.skip(f"{name} is not installed here")
    return found


def kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text())


@functools.cache
def _render() -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc is not None)


def rendered() -> list[dict[str, Any]]:
    """Every object ``kubectl kustomize deploy/`` renders (a fresh copy each call)."""
    return yaml.safe_load(yaml.safe_dump(list(_render())))


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered() if doc["kind"] == kind]


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected wherever it lists the fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = shared(CRDS / f"ray.io_{kind.lower()}s.yaml")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
    return strict(version["schema"]["openAPIV3Schema"])


def validate(kind: str, obj: dict[str, Any]) -> None:
    import jsonschema

    assert obj["apiVersion"] == "ray.io/v1", obj["apiVersion"]
    jsonschema.validate(obj, crd_schema(kind), cls=jsonschema.Draft7Validator)


def check_metadata(obj: dict[str, Any], max_length: int = 253) -> None:
    name = obj["metadata"]["name"]
    assert DNS_SUBDOMAIN.match(name) and len(name) <= max_length, name


def image() -> str:
    (entry,) = kustomization()["images"]
    return f"{entry['newName']}:{entry['newTag']}"


def nightly_script() -> str:
    template = next(c for c in by_kind("ConfigMap") if "create-rayjob.sh" in c["data"])
    return template["data"]["create-rayjob.sh"]


def nightly_rayjob(day: str = "2026-11-21") -> dict[str, Any]:
    """The RayJob the CronJob's script creates, filled in as its ``sed`` does."""
    template = next(c for c in by_kind("ConfigMap") if "rayjob.yaml" in c["data"])
    text = template["data"]["rayjob.yaml"].replace("__DATE__", day)
    return yaml.safe_load(text.replace("__IMAGE__", image()))


def test_kustomize_renders_every_manifest_with_the_image_set_once() -> None:
    resources = kustomization()["resources"]
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - {KUSTOMIZATION.name, SECRETS.name}
    assert set(resources) == manifests  # every manifest is in the base, once
    assert len(rendered()) == sum(len(documents(DEPLOY / name)) for name in resources) == 10
    assert {"CronJob", "ServiceAccount", "Role", "RoleBinding", "PodMonitor"} <= {
        o["kind"] for o in rendered()
    }
    for obj in rendered():
        assert {"apiVersion", "kind", "metadata"} <= set(obj), obj["kind"]
        check_metadata(obj)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "dreamshard"
        assert labels["app.kubernetes.io/component"] in COMPONENTS  # for `apply -l`
    kubectl_image = cronjob_containers()[0]["image"]
    ray_images = {i for obj in rendered() for i in images(obj)} - {kubectl_image}
    assert ray_images == {image()}  # no bare `dreamshard` left, no second version
    assert set(images(nightly_rayjob())) == {image()}
    (env,) = [e for e in cronjob_containers()[0]["env"] if e["name"] == "DREAMSHARD_IMAGE"]
    assert env["value"] == image()  # the nightly template gets the same image
    assert nightly_rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == ray_version()
    documented = set(re.findall(r"component[= ]in \(([^)]*)\)|component=([a-z-]+)", readme()))
    named = {name.strip() for pair in documented for group in pair for name in group.split(",")}
    assert named - {""} == COMPONENTS  # deploy/README.md applies each piece by its label


def images(node: Any) -> list[str]:
    """Every ``image`` field anywhere in an object."""
    if isinstance(node, list):
        return [i for item in node for i in images(item)]
    if not isinstance(node, dict):
        return []
    found = [node["image"]] if isinstance(node.get("image"), str) else []
    return found + [i for value in node.values() for i in images(value)]


def ray_version() -> str:
    (pin,) = re.findall(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    return pin


def readme() -> str:
    return (DEPLOY / "README.md").read_text()


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayCronJob"])
def test_kuberay_objects_validate_against_the_crd(kind: str) -> None:
    objects = by_kind(kind) + ([nightly_rayjob()] if kind == "RayJob" else [])
    assert objects
    for obj in objects:
        validate(kind, obj)


def test_the_strict_schema_catches_a_misspelt_field() -> None:
    import jsonschema

    job = nightly_rayjob()
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate("RayJob", job)


def job_specs() -> list[dict[str, Any]]:
    jobs = [job["spec"] for job in [*by_kind("RayJob"), nightly_rayjob()]]
    return jobs + [c["spec"]["jobTemplate"] for c in by_kind("RayCronJob")]


def cluster_specs() -> list[dict[str, Any]]:
    specs = [c["spec"] for c in by_kind("RayCluster")]
    return specs + [job["rayClusterSpec"] for job in job_specs()]


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def uses_token(env: list[dict[str, Any]]) -> bool:
    """RAY_AUTH_MODE=token, RAY_AUTH_TOKEN from the token Secret."""
    values = {e["name"]: e for e in env}
    return (
        values["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
        and values["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": TOKEN_SECRET}
        and "value" not in values["RAY_AUTH_TOKEN"]
    )


def test_clusters_have_a_cpu_head_bounded_gpu_workers_secrets_and_token_auth() -> None:
    specs = cluster_specs()
    assert len(specs) == 4  # RayCluster, RayJob, the nightly RayJob, RayCronJob
    for spec in specs:
        assert spec["rayVersion"] == ray_version()
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # no actors on the head
        assert all(
            "nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(head["template"])
        )
        (gpu,) = spec["workerGroupSpecs"]
        assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
        for container in containers(gpu["template"]):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert uses_token(spec["autoscalerOptions"]["env"])  # the autoscaler talks to GCS
        for group in (head, gpu):
            assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
            for container in containers(group["template"]):
                assert {"secretRef": {"name": "dreamshard-s3"}} in container["envFrom"]
                assert uses_token(container["env"])
                for env in container["env"]:  # a secret's value never sits in a manifest
                    assert not SECRET_NAME.search(env["name"]) or "value" not in env, env
    for job in job_specs():  # the submitter's `ray job submit` needs the token as well
        pod = job["submitterPodTemplate"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
        (submitter,) = pod["containers"]
        assert "command" not in submitter  # KubeRay supplies `ray job submit ...`
        assert uses_token(submitter["env"])


def test_jobs_run_dreamshard_on_the_mounted_config_and_clean_up() -> None:
    config_maps = {c["metadata"]["name"]: c for c in by_kind("ConfigMap")}
    for spec in job_specs():
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["dreamshard", "run"]
        args = build_parser().parse_args(argv[1:])  # the entrypoint is a valid command line
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v["configMap"]["name"] for v in head["volumes"] if "configMap" in v}
        (volume,) = [name for name, path in mounts.items() if args.config.startswith(path + "/")]
        data = config_maps[volumes[volume]]["data"][Path(args.config).name]
        config = parse_config(yaml.safe_load(data))  # the mounted config validates
        assert config.runtime.executor == "ray"
        assert config.run.output.startswith("s3://")
        assert not {"key", "secret", "token"} & set(config.run.storage_options)
        for override in args.overrides:
            assert override == "run.name=nightly-2026-11-21"  # the dated CronJob job


def cronjob_containers() -> list[dict[str, Any]]:
    (cron,) = by_kind("CronJob")
    return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]


def test_the_cronjob_creates_a_dated_rayjob_with_the_rights_it_needs() -> None:
    (cron,) = by_kind("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    check_metadata(cron, max_length=52)  # CronJob names are limited to 52 characters
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and spec["concurrencyPolicy"] in {"Allow", "Forbid", "Replace"}
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"OnFailure", "Never"}  # Jobs refuse Always
    (container,) = pod["containers"]
    assert DNS_LABEL.match(container["name"]) and container["command"][0] == "/bin/sh"
    # an image with a shell and kubectl: registry.k8s.io/kubectl has no shell and
    # bitnami/kubectl's versioned tags are gone
    assert re.fullmatch(r"alpine/k8s:1\.\d+\.\d+", container["image"]), container["image"]
    (account,) = by_kind("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    (role,) = by_kind("Role")
    (binding,) = by_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in binding["subjects"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    script = nightly_script()
    verbs = set(re.findall(r"kubectl (\w+)", script))
    if re.search(r"kubectl get rayjob -l ", script):
        verbs.add("list")  # a get by label selector lists
    assert verbs == set(rule["verbs"]) and verbs <= VERBS  # exactly the rights it uses
    job = nightly_rayjob("2026-11-21")
    assert job["metadata"]["name"] == "dreamshard-nightly-2026-11-21"
    assert len(f"{job['metadata']['name']}-raycluster-abcde") <= 63  # names KubeRay derives
    assert dt.date.fromisoformat("2026-11-21")  # the date format the script writes


STUB_KUBECTL = """#!/bin/sh
echo "$*" >> "$STUB_DIR/calls"
case "$1 $2" in
  "get rayjob")
    if [ "$3" = "-l" ]; then cat "$STUB_DIR/listed"; exit 0; fi
    [ -f "$STUB_DIR/state" ] && cat "$STUB_DIR/state" && exit 0
    exit 1 ;;
  "create -f") cat > "$STUB_DIR/created.yaml" ;;
esac
"""


def run_nightly(tmp_path: Path, state: str | None) -> tuple[list[str], Path]:
    """The CronJob's script with its mounted template, against a stub kubectl."""
    template = next(c for c in by_kind("ConfigMap") if "rayjob.yaml" in c["data"])
    (tmp_path / "template").mkdir()
    for name, text in template["data"].items():
        (tmp_path / "template" / name).write_text(text)
    script = (tmp_path / "template" / "create-rayjob.sh").read_text()
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "kubectl"
    stub.write_text(STUB_KUBECTL)
    stub.chmod(0o755)
    today = dt.datetime.now(dt.timezone.utc).date()
    old = [today - dt.timedelta(days=d) for d in (30, 15, 14, 1)]
    (tmp_path / "listed").write_text(" ".join(f"dreamshard-nightly-{d}" for d in old))
    if state is not None:
        (tmp_path / "state").write_text(state)
    env = {c["name"]: c["value"] for c in cronjob_containers()[0]["env"]}
    env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", STUB_DIR=str(tmp_path))
    script = script.replace("/template/", f"{tmp_path}/template/")
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True, timeout=30)
    return (tmp_path / "calls").read_text().splitlines(), tmp_path / "created.yaml"


def test_the_nightly_script_cleans_up_old_rayjobs_and_creates_tonights(tmp_path: Path) -> None:
    today = dt.datetime.now(dt.timezone.utc).date()
    calls, created = run_nightly(tmp_path, state=None)
    deleted = [c.split()[2] for c in calls if c.startswith("delete rayjob")]
    old = [f"dreamshard-nightly-{today - dt.timedelta(days=d)}" for d in (30, 15)]
    assert deleted == old  # older than KEEP_DAYS=14; the last 14 nights stay
    job = yaml.safe_load(created.read_text())
    assert job["metadata"]["name"] == f"dreamshard-nightly-{today}"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "nightly-run"
    validate("RayJob", job)
    assert yaml.safe_dump(job).count(image()) == 3  # head, worker, submitter


def test_the_nightly_script_leaves_a_running_rayjob_alone(tmp_path: Path) -> None:
    calls, created = run_nightly(tmp_path, state="Running")
    assert not created.exists() and not any(c.startswith("create") for c in calls)


def test_podmonitor_scrapes_the_dreamshard_metrics_of_every_ray_pod() -> None:
    (monitor,) = by_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector["ray.io/is-ray-node"] == "yes"  # KubeRay's label on Ray pods
    own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (keep,) = endpoint["metricRelabelings"]
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__name__"]
    names = re.findall(r"`(ray_dreamshard_\w+)`", readme())
    assert all(re.fullmatch(keep["regex"], n) for n in names)
    source = (REPO / "pipeline" / "execution" / "metrics.py").read_text()
    defined = set(re.findall(r'"(dreamshard_\w+)"', source))
    assert {re.sub(r"_total$", "", n.removeprefix("ray_")) for n in names} == defined
    assert {"dreamshard_shards_in_flight", "dreamshard_shard_synthesis_seconds"} <= defined
    for spec in cluster_specs():
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            assert own.items() <= group["template"]["metadata"]["labels"].items()
            assert group["rayStartParams"]["metrics-export-port"] == "8080"
            for container in containers(group["template"]):
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert ports[endpoint["port"]] == 8080


def test_config_maps_and_the_example_secrets_match_what_the_pods_read() -> None:
    for config_map in by_kind("ConfigMap"):
        assert config_map["apiVersion"] == "v1"
        for key, value in config_map["data"].items():
            assert CONFIG_KEY.match(key) and isinstance(value, str)
    secrets = {s["metadata"]["name"]: s for s in documents(SECRETS)}
    for secret in secrets.values():
        assert secret["apiVersion"] == "v1" and secret["type"] == "Opaque"
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}  # placeholders only
        assert "data" not in secret
        check_metadata(secret)
    assert set(secrets["dreamshard-s3"]["stringData"]) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    text = yaml.safe_dump([*rendered(), nightly_rayjob()])
    assert "kind: Secret" not in text  # never applied from placeholders
    refs = set(re.findall(r"secretKeyRef:\n\s+key: (\S+)\n\s+name: (\S+)", text))
    assert refs == {("auth_token", "dreamshard-ray-token")}
    assert "auth_token" in secrets["dreamshard-ray-token"]["stringData"]
    assert set(re.findall(r"secretRef:\n\s+name: (\S+)", text)) == {"dreamshard-s3"}
    assert secrets.keys() == {"dreamshard-s3", "dreamshard-ray-token"}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_python_311_compiler_dependency_layer_non_root_no_secrets() -> None:
    steps = dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in steps if k == "ARG" and "=" in a}
    (base,) = [a for k, a in steps if k == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.match(r"python:3\.11(\.\d+)?-slim-\w+$", base), base  # what the pins were made for
    assert "Python 3.11" in (REPO / "constraints.txt").read_text().splitlines()[0]
    runs = [(i, a) for i, (k, a) in enumerate(steps) if k == "RUN"]
    (apt,) = [a for _, a in runs if "apt-get install" in a]
    assert {"gcc", "libc6-dev"} <= set(apt.split())  # Triton's launcher: compiler + libc headers
    copies = [(i, a.split()[:-1]) for i, (k, a) in enumerate(steps) if k == "COPY"]
    (deps_copy,) = [i for i, sources in copies if "constraints.txt" in sources]
    assert set(copies[0][1]) == {"pyproject.toml", "constraints.txt"} and copies[0][0] == deps_copy
    (deps,) = [(i, a) for i, a in runs if "-r requirements.txt" in a]
    assert "pip install --no-cache-dir -c constraints.txt -r requirements.txt" in deps[1]
    source = [
        i for i, sources in copies if {"synthesizers", "pipeline", "evaluation"} & set(sources)
    ]
    assert deps_copy < deps[0] < min(source)  # dependencies cached apart from the source
    (install,) = [(i, a) for i, a in runs if "--no-deps" in a]
    assert re.search(r"pip install --no-cache-dir --no-deps -c constraints.txt \.( |$)", install[1])
    assert install[0] > max(source)
    for kind, arguments in steps:
        if kind == "COPY":
            *sources, _ = arguments.split()
            assert all((REPO / s).exists() for s in sources), arguments
        if kind in ("ENV", "ARG"):
            assert not SECRET_NAME.search(arguments), arguments
    users = [i for i, (k, _) in enumerate(steps) if k == "USER"]
    assert users and max(users) > max(i for i, _ in runs)
    assert steps[users[-1]][1].split(":")[0] not in {"root", "0"}
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs", ".env"} <= ignored


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_the_gauges_record_with_their_tags_and_do_nothing_outside_ray() -> None:
    """In a fresh process: outside Ray every call does nothing; on real Ray metric objects
    (built without a cluster) every record matches its metric's tag keys and bounds."""
    code = """
import logging, ray
from pipeline.execution import metrics
from pipeline.io.shards import Sidecar
errors = []
logging.getLogger("dreamshard.metrics").addHandler(
    type("H", (logging.Handler,), {"emit": lambda self, r: errors.append(r.getMessage())})())
sidecar = Sidecar(shard="seed-000000", samples=4, sha256="0" * 64, seconds=3.0,
                  synthesized=4, accepted=4, synthesis_seconds=2.5)
metrics.record_shard_started("run", "deepinversion")
metrics.record_shard(sidecar, "run", "deepinversion")
assert metrics._metrics is None and not ray.is_initialized()
real = metrics.ShardMetrics()
metrics._get = lambda: real
metrics.record_shard_started("run", "deepinversion")
metrics.record_shard(sidecar, "run", "deepinversion")
metrics.record_failure("run", "deepinversion")
assert not errors, errors
assert not ray.is_initialized()
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
