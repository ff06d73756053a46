"""deploy/: every manifest parses; KubeRay objects validate against the CRDs' OpenAPI v3
schemas (unknown fields rejected, as ``kubectl apply --validate=strict`` does); core
objects carry the fields the Kubernetes API requires; the Dockerfile is checked
statically (it cannot be built here)."""

from __future__ import annotations

import datetime as dt
import functools
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, SHARED, shared

from pipeline.cli.main import build_parser
from pipeline.config import parse_config

DEPLOY = REPO / "deploy"
CRDS = SHARED / "specs" / "kuberay"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in MANIFESTS for doc in documents(path)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_objects() if doc["kind"] == kind]


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


def nightly_rayjob(day: str = "2026-11-21") -> dict[str, Any]:
    """The RayJob the CronJob's script creates, with the date filled in as ``sed`` does."""
    template = next(c for c in by_kind("ConfigMap") if "rayjob.yaml" in c["data"])
    return yaml.safe_load(template["data"]["rayjob.yaml"].replace("__DATE__", day))


def test_every_manifest_parses_and_names_its_kind() -> None:
    assert {p.name for p in MANIFESTS} >= {
        "raycluster.yaml",
        "rayjob.yaml",
        "raycronjob.yaml",
        "cronjob.yaml",
        "configmap.yaml",
        "secret.example.yaml",
    }
    for name, obj in all_objects():
        assert {"apiVersion", "kind", "metadata"} <= set(obj), name
        check_metadata(obj)


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


def cluster_specs() -> list[dict[str, Any]]:
    jobs = [*by_kind("RayJob"), nightly_rayjob()]
    specs = [job["spec"]["rayClusterSpec"] for job in jobs]
    specs += [c["spec"]["jobTemplate"]["rayClusterSpec"] for c in by_kind("RayCronJob")]
    return [c["spec"] for c in by_kind("RayCluster")] + specs


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def test_clusters_have_a_cpu_head_and_bounded_gpu_workers_with_the_secret() -> None:
    for spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # no actors on the head
        assert all(
            "nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(head["template"])
        )
        (gpu,) = spec["workerGroupSpecs"]
        assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
        for container in containers(gpu["template"]):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        for group in (head, gpu):
            assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
            for container in containers(group["template"]):
                assert {"secretRef": {"name": "dreamshard-s3"}} in container["envFrom"]
                assert not any(SECRET_NAME.search(e["name"]) for e in container.get("env", []))


def test_jobs_run_dreamshard_on_the_mounted_config_and_clean_up() -> None:
    config_maps = {c["metadata"]["name"]: c for c in by_kind("ConfigMap")}
    jobs = [*by_kind("RayJob"), nightly_rayjob()]
    jobs += [{"spec": c["spec"]["jobTemplate"]} for c in by_kind("RayCronJob")]
    for job in jobs:
        spec = job["spec"]
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


def test_the_cronjob_creates_a_dated_rayjob_with_the_rights_it_needs() -> None:
    (cron,) = by_kind("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    check_metadata(cron, max_length=52)  # CronJob names are limited to 52 characters
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and spec["concurrencyPolicy"] in {"Allow", "Forbid", "Replace"}
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"OnFailure", "Never"}  # Jobs refuse Always
    for container in pod["containers"]:
        assert DNS_LABEL.match(container["name"]) and container["image"]
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
    script = next(c for c in by_kind("ConfigMap") if "create-rayjob.sh" in c["data"])["data"]
    verbs = set(re.findall(r"kubectl (\w+)", script["create-rayjob.sh"]))
    assert verbs == set(rule["verbs"]) and verbs <= VERBS  # exactly the rights it uses
    job = nightly_rayjob("2026-11-21")
    assert job["metadata"]["name"] == "dreamshard-nightly-2026-11-21"
    assert len(f"{job['metadata']['name']}-raycluster-abcde") <= 63  # names KubeRay derives
    assert dt.date.fromisoformat("2026-11-21")  # the date format the script writes


def test_config_maps_and_the_example_secret() -> None:
    for config_map in by_kind("ConfigMap"):
        assert config_map["apiVersion"] == "v1"
        for key, value in config_map["data"].items():
            assert CONFIG_KEY.match(key) and isinstance(value, str)
    (secret,) = by_kind("Secret")
    assert secret["apiVersion"] == "v1" and secret["type"] == "Opaque"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}  # placeholders only
    assert "data" not in secret


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_cuda_runtime_base_pinned_install_non_root_no_secrets() -> None:
    steps = dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in steps if k == "ARG" and "=" in a}
    (base,) = [a for k, a in steps if k == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+$", base), base
    runs = [a for k, a in steps if k == "RUN"]
    (install,) = [r for r in runs if "pip install" in r]
    assert re.search(r"pip install --no-cache-dir -c constraints.txt \.( |$)", install)
    for kind, arguments in steps:
        if kind == "COPY":
            *sources, _ = arguments.split()
            assert all((REPO / s).exists() for s in sources), arguments
        if kind in ("ENV", "ARG"):
            assert not SECRET_NAME.search(arguments), arguments
    users = [i for i, (k, _) in enumerate(steps) if k == "USER"]
    assert users and max(users) > max(i for i, (k, _) in enumerate(steps) if k == "RUN")
    assert steps[users[-1]][1].split(":")[0] not in {"root", "0"}
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs", ".env"} <= ignored
