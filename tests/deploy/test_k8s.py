"""deploy/k8s: base and overlays rendered in Python, validated against Kubernetes' schemas and checked.

There is no kustomize binary here, so ``render`` implements the subset the overlays use:
``resources`` (files or a base folder) and ``patches`` given by ``path`` as strategic-merge
patches, matched to a resource by apiVersion, kind and name. Maps merge, ``null`` deletes,
lists of named maps (containers, env, volumes, ...) merge by ``name``, other lists are replaced.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway import config as gateway_config
from ranking_service import config as ranking_config
from retrieval_service import config as retrieval_config
from tests.deploy import PROJECT_PREFIXES, REPO_ROOT, foreign_names

K8S = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"  # schemas shipped by kubernetes-validate 1.37.0
OVERLAYS = ("base", "overlays/cpu", "overlays/gpu")
SERVICES = {"recsys-retrieval": ("retrieval_service", retrieval_config),
            "recsys-ranking": ("ranking_service", ranking_config)}
TRAINER = "recsys-trainer"
GATEWAY = "recsys-gateway"
ALLOWED_PLAIN_ENV = {"OMP_NUM_THREADS"}

Doc = dict[str, Any]


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge of ``patch`` into ``base`` (the subset described in the module docstring)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged_list = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged_list)}
        for item in patch:
            if item["name"] in index:
                merged_list[index[item["name"]]] = merge(merged_list[index[item["name"]]], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def key(doc: Doc) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


def render(folder: Path) -> list[Doc]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{folder}: render() does not implement {sorted(unsupported)}"
    docs: list[Doc] = []
    for resource in kustomization["resources"]:
        path = folder / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for patch_ref in kustomization.get("patches", []):
        assert set(patch_ref) == {"path"}, f"{folder}: only file patches are rendered, got {patch_ref}"
        patch = yaml.safe_load((folder / patch_ref["path"]).read_text())
        matches = [i for i, doc in enumerate(docs) if key(doc) == key(patch)]
        assert len(matches) == 1, f"{folder}/{patch_ref['path']} matches {len(matches)} resources"
        docs[matches[0]] = merge(docs[matches[0]], patch)
    assert len({key(doc) for doc in docs}) == len(docs), f"{folder}: duplicate resources"
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> list[Doc]:
    return render(K8S / request.param)


@pytest.fixture(scope="module")
def variants() -> dict[str, list[Doc]]:
    return {name: render(K8S / name) for name in OVERLAYS}


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_templates(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(workload name, pod template) of every Deployment and CronJob."""
    for doc in docs:
        if doc["kind"] == "Deployment":
            yield doc["metadata"]["name"], doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    return env


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND every matchExpression)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
        if operator == "DoesNotExist" and value is not None:
            return False
    return True


def grace_s(docs: list[Doc], workload: str, pod: Doc) -> float:
    config = gateway_config if workload == GATEWAY else SERVICES[workload][1]
    return config.from_env(container_env(docs, pod["spec"]["containers"][0])).grace_s


# --- the renderer itself -------------------------------------------------------------------------


def test_merge_semantics():
    base = {"a": {"x": 1, "y": 2}, "drop": 1, "containers": [{"name": "c", "image": "i", "env": [
        {"name": "A", "value": "1"}]}], "args": ["--one", "--two"]}
    patch = {"a": {"y": 3}, "drop": None, "containers": [{"name": "c", "env": [{"name": "B", "value": "2"}]},
                                                        {"name": "d", "image": "j"}], "args": ["--three"]}
    assert merge(base, patch) == {
        "a": {"x": 1, "y": 3}, "args": ["--three"],
        "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                       {"name": "d", "image": "j"}]}
    assert base["containers"][0]["env"] == [{"name": "A", "value": "1"}], "the base is not modified"


def test_patches_change_the_base(variants):
    base, gpu = variants["base"], variants["overlays/gpu"]
    assert len(base) == len(gpu) == len(variants["overlays/cpu"])
    assert find(base, "Deployment", "recsys-retrieval") != find(gpu, "Deployment", "recsys-retrieval")


# --- schema ----------------------------------------------------------------------------------------


def test_every_manifest_validates_against_the_kubernetes_schema(rendered):
    kinds = set()
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "CronJob", "NetworkPolicy"}


def test_base_is_namespace_less(variants):
    assert "namespace" not in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    for docs in variants.values():
        assert all("namespace" not in doc["metadata"] for doc in docs)


# --- the services ----------------------------------------------------------------------------------


def test_env_names_are_read_by_each_program(rendered):
    for workload, pod in pod_templates(rendered):
        for container in pod["spec"]["containers"]:
            env = container_env(rendered, container)
            if workload in SERVICES:
                assert foreign_names(SERVICES[workload][0], set(env)) == set(), workload
                SERVICES[workload][1].from_env(env)  # values parse too
            elif workload == TRAINER:
                assert foreign_names("trainer", set(env)) == set()
            elif workload == GATEWAY:
                assert foreign_names("gateway", set(env)) == set()
                gateway_config.from_env(env)
            plain = {name for name in env if not name.startswith(PROJECT_PREFIXES)}
            assert plain <= ALLOWED_PLAIN_ENV, (workload, plain)


def test_probes_are_native_grpc_on_the_configured_port(rendered):
    for workload, (_, config_module) in SERVICES.items():
        pod = find(rendered, "Deployment", workload)["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        config = config_module.from_env(container_env(rendered, container))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": config.port, "metrics": config.metrics_port}
        defaults = config_module.from_env({"RECSYS_ARTIFACT_ROOT": "/artifacts"})
        assert (config.port, config.metrics_port) == (defaults.port, defaults.metrics_port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": config.port}, (workload, probe)
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading gets minutes"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics_port)


def test_gateway_probes_are_http_on_the_configured_port(rendered):
    pod = find(rendered, "Deployment", GATEWAY)["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = gateway_config.from_env(container_env(rendered, container))
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": config.port}
    assert config.port == gateway_config.GatewayConfig().port
    paths = {probe: container[probe]["httpGet"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": {"path": "/healthz", "port": "http"},
                     "readinessProbe": {"path": "/readyz", "port": "http"},
                     "livenessProbe": {"path": "/healthz", "port": "http"}}
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(config.port), "/metrics")


def test_gateway_reaches_every_ranking_pod(rendered):
    target = find(rendered, "ConfigMap", "recsys-gateway-env")["data"]["GATEWAY_RANKING_TARGET"]
    host, port = re.fullmatch(r"dns:///([\w-]+):(\d+)", target).groups()
    service = find(rendered, "Service", host)
    assert service["spec"]["clusterIP"] == "None", "headless, so dns:/// sees every pod"
    ranking = find(rendered, "Deployment", "recsys-ranking")["spec"]["template"]
    assert selects({"matchLabels": service["spec"]["selector"]}, ranking["metadata"]["labels"])
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert int(port) == ranking_config.from_env(container_env(rendered, ranking["spec"]["containers"][0])).port


def test_termination_grace_exceeds_pre_stop_plus_drain(rendered):
    for workload in (*SERVICES, GATEWAY):
        pod = find(rendered, "Deployment", workload)["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        grace = grace_s(rendered, workload, pod)
        assert pod["spec"]["terminationGracePeriodSeconds"] > float(command[1]) + grace


def test_security_contexts(rendered):
    for workload, pod in pod_templates(rendered):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, workload
        assert spec["securityContext"]["runAsUser"] != 0, workload
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        assert spec["automountServiceAccountToken"] is False, workload
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, workload
            assert context["readOnlyRootFilesystem"] is True, workload
            assert context["capabilities"] == {"drop": ["ALL"]}, workload
            assert context.get("runAsNonRoot", True) is True, workload
            assert context.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], workload


def test_services_and_apps_run_as_the_images_uid(rendered):
    for workload, pod in pod_templates(rendered):
        if workload in SERVICES or workload in (TRAINER, GATEWAY):
            context = pod["spec"]["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (10001, 10001, 10001)
            writable = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]
                        if not m.get("readOnly")}
            assert "/tmp" in writable, "the only writable place besides volumes"


def test_artifacts_pvc_is_rwx_and_services_mount_it_read_only(rendered):
    pvc = find(rendered, "PersistentVolumeClaim", "recsys-artifacts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload, pod in pod_templates(rendered):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        container = pod["spec"]["containers"][0]
        for mount in container["volumeMounts"]:
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {})
            if claim.get("claimName") != "recsys-artifacts":
                continue
            assert mount["mountPath"] == container_env(rendered, container)["RECSYS_ARTIFACT_ROOT"]
            if workload in SERVICES:
                assert mount["readOnly"] is True and claim["readOnly"] is True, workload
            else:
                assert workload == TRAINER and not mount.get("readOnly"), workload
    users = {w for w, pod in pod_templates(rendered)
             if any(v.get("persistentVolumeClaim", {}).get("claimName") == "recsys-artifacts"
                    for v in pod["spec"]["volumes"])}
    assert users == {*SERVICES, TRAINER}


def test_k8s_services_route_to_named_container_ports(rendered):
    pods = dict(pod_templates(rendered))
    for service in (d for d in rendered if d["kind"] == "Service"):
        targets = [w for w, pod in pods.items() if selects({"matchLabels": service["spec"]["selector"]},
                                                           pod["metadata"]["labels"])]
        # a Service is named after its workload, or after it with a suffix (recsys-ranking-pods, headless)
        name = service["metadata"]["name"]
        assert len(targets) == 1 and (name == targets[0] or name.startswith(targets[0] + "-")), name
        port_names = {p["name"] for c in pods[targets[0]]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_redis_url_and_retrieval_target_name_real_services(rendered):
    shared = find(rendered, "ConfigMap", "recsys-shared-env")["data"]
    host, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", shared["RECSYS_REDIS_URL"]).groups()
    redis = find(rendered, "Service", host)
    assert [p["port"] for p in redis["spec"]["ports"]] == [int(port)]
    target = find(rendered, "ConfigMap", "recsys-ranking-env")["data"]["RANKING_RETRIEVAL_TARGET"]
    host, port = re.fullmatch(r"dns:///([\w-]+):(\d+)", target).groups()
    retrieval = find(rendered, "Service", host)
    assert retrieval["spec"]["clusterIP"] == "None", "headless, so dns:/// sees every pod"
    assert [p["port"] for p in retrieval["spec"]["ports"]] == [int(port)]


def test_hpas_and_pdbs_cover_the_services_and_the_gateway(rendered):
    pods = dict(pod_templates(rendered))
    for workload in (*SERVICES, GATEWAY):
        hpa = find(rendered, "HorizontalPodAutoscaler", workload)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": workload}
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        pdb = find(rendered, "PodDisruptionBudget", workload)
        covered = [w for w, pod in pods.items() if selects(pdb["spec"]["selector"], pod["metadata"]["labels"])]
        assert covered == [workload]


def test_deployment_selectors_match_their_pods(rendered):
    for doc in (d for d in rendered if d["kind"] == "Deployment"):
        assert selects(doc["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"])


# --- network policies ------------------------------------------------------------------------------


def allowed_sources(docs: list[Doc], target: str, port: int) -> set[str]:
    """Workloads of this install whose pods may open ``port`` on ``target``'s pods."""
    pods = dict(pod_templates(docs))
    policies = [p for p in docs if p["kind"] == "NetworkPolicy"
                and selects(p["spec"]["podSelector"], pods[target]["metadata"]["labels"])]
    assert policies and all("Ingress" in p["spec"]["policyTypes"] for p in policies), target
    sources = set()
    for rule in (r for p in policies for r in p["spec"].get("ingress", [])):
        if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
            continue
        assert rule.get("from"), f"an ingress rule to {target} without 'from' admits everyone"
        for peer in rule["from"]:
            # Without namespaceSelector a peer means "this namespace": all of our workloads live here.
            sources |= {w for w, pod in pods.items()
                        if "podSelector" in peer and selects(peer["podSelector"], pod["metadata"]["labels"])}
    return sources


def test_only_ranking_reaches_retrieval(rendered):
    config = retrieval_config.from_env({"RECSYS_ARTIFACT_ROOT": "/artifacts"})
    assert allowed_sources(rendered, "recsys-retrieval", config.port) == {"recsys-ranking"}
    assert allowed_sources(rendered, "recsys-retrieval", config.metrics_port) == set()


def test_only_the_services_and_the_trainer_reach_redis(rendered):
    assert allowed_sources(rendered, "recsys-redis", 6379) == {*SERVICES, TRAINER}


def test_metrics_scrapers_are_selected_by_label_only(rendered):
    policy = find(rendered, "NetworkPolicy", "recsys-retrieval-ingress")
    scrape = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"protocol": "TCP", "port": 9101}]]
    assert [peer["podSelector"] for r in scrape for peer in r["from"]] == [
        {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}]


# --- trainer and overlays --------------------------------------------------------------------------


def test_trainer_is_a_cron_job_that_never_overlaps(rendered):
    cron = find(rendered, "CronJob", TRAINER)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = job["template"]["spec"]["containers"]
    assert container_env(rendered, container)["RECSYS_DATA_DIR"] in {m["mountPath"] for m in container["volumeMounts"]}


def gpu_limit(container: Doc) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def containers_by_workload(docs: list[Doc]) -> dict[str, Doc]:
    return {w: pod["spec"]["containers"][0] for w, pod in pod_templates(docs)}


def test_base_and_cpu_overlay_use_no_gpu(variants):
    for name in ("base", "overlays/cpu"):
        for workload, container in containers_by_workload(variants[name]).items():
            assert gpu_limit(container) == 0 and "gpu" not in container["image"], (name, workload)
    device = {name: find(variants[name], "ConfigMap", "recsys-retrieval-env")["data"]["RETRIEVAL_DEVICE"]
              for name in OVERLAYS}
    assert device == {"base": "auto", "overlays/cpu": "cpu", "overlays/gpu": "cuda"}


def test_gpu_overlay_gives_retrieval_and_trainer_one_gpu_and_the_cuda_images(variants):
    docs = variants["overlays/gpu"]
    containers = containers_by_workload(docs)
    for workload in ("recsys-retrieval", TRAINER):
        container = containers[workload]
        assert gpu_limit(container) == 1, workload
        assert container["image"] == f"{workload}-gpu:0.1.0"
        assert container["resources"]["limits"]["cpu"], "the base's limits are kept, not replaced"
    assert gpu_limit(containers["recsys-ranking"]) == 0 and gpu_limit(containers["recsys-redis"]) == 0
    pods = dict(pod_templates(docs))
    for workload in ("recsys-retrieval", TRAINER):
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pods[workload]["spec"][
            "tolerations"]


def test_images_carry_no_registry_host(variants):
    for docs in variants.values():
        for workload, container in containers_by_workload(docs).items():
            image = container["image"]
            assert "/" not in image.split(":")[0] and ":" in image, (workload, image)


def test_gpu_images_have_dockerfiles(variants):
    for workload, container in containers_by_workload(variants["overlays/gpu"]).items():
        if workload in (*SERVICES, TRAINER):
            component = workload.removeprefix("recsys-")
            suffix = ".gpu" if container["image"].endswith("-gpu:0.1.0") else ""
            assert (REPO_ROOT / "deploy" / f"Dockerfile.{component}{suffix}").is_file(), workload


def test_overlay_files_are_all_used():
    for overlay in ("cpu", "gpu"):
        folder = K8S / "overlays" / overlay
        used = {p["path"] for p in yaml.safe_load((folder / "kustomization.yaml").read_text())["patches"]}
        assert used == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    used = set(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"])
    assert used == {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}

