"""Kubernetes manifests (deploy/k8s), validated offline: every overlay is rendered by a small kustomize
subset written here (resources, labels, images, replicas, strategic-merge patches: what the files use; no
kustomize binary recent enough is installable here) and each object is checked against the Kubernetes schemas
with kubernetes-validate in strict mode, then the wiring an operator relies on is asserted."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KNOWN_FIELDS = {"apiVersion", "kind", "resources", "labels", "images", "replicas", "patches"}


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge, as far as these files need it: maps merge key by key (None deletes), lists of maps
    with a ``name`` merge item by item, other values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(base.get(key), value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                   for i in base + patch):
        out = list(base)
        for item in patch:
            index = next((n for n, old in enumerate(out) if old["name"] == item["name"]), None)
            if index is None:
                out.append(item)
            else:
                out[index] = _merge(out[index], item)
        return out
    return patch


def _containers(obj: dict) -> list[dict]:
    return obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def render(folder: Path) -> list[dict]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(spec) <= KNOWN_FIELDS, f"{folder}: fields this renderer does not know: {set(spec) - KNOWN_FIELDS}"
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        assert path.exists(), f"{folder}: resource {entry} does not exist"
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch_entry in spec.get("patches", []):
        patch = yaml.safe_load((folder / patch_entry["path"]).read_text())
        targets = [n for n, o in enumerate(objects)
                   if o["kind"] == patch["kind"] and o["metadata"]["name"] == patch["metadata"]["name"]]
        assert len(targets) == 1, f"{folder}: patch {patch_entry['path']} matches {len(targets)} objects"
        objects[targets[0]] = _merge(objects[targets[0]], patch)
    for replica in spec.get("replicas", []):
        matches = [o for o in objects if o["metadata"]["name"] == replica["name"] and "replicas" in o["spec"]]
        assert matches, f"{folder}: replicas for unknown {replica['name']}"
        for obj in matches:
            obj["spec"]["replicas"] = replica["count"]
    for image in spec.get("images", []):
        used = [c for o in objects for c in _containers(o) if c["image"].split(":")[0] == image["name"]]
        assert used, f"{folder}: image {image['name']} is used by no container"
        for container in used:
            tag = image.get("newTag", container["image"].partition(":")[2] or "latest")
            container["image"] = f"{image.get('newName', image['name'])}:{tag}"
    for label in spec.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    return [copy.deepcopy(o) for o in objects]


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("folder", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_rendered_manifests_pass_the_kubernetes_schemas(folder):
    objects = render(folder)
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{folder.name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                        f"{'.'.join(map(str, exc.path))}")


def test_the_validator_and_the_renderer_catch_mistakes(tmp_path):
    with pytest.raises(kubernetes_validate.ValidationError):  # a typo'd field, as strict validation sees it
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                                      "spec": {"prots": []}}, kubernetes_validate.latest_version(), strict=True)
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(AssertionError, match="does not exist"):
        render(tmp_path)


def test_gateway_points_at_the_worker_service_and_probes_readiness():
    objects = render(K8S / "base")
    gateway = _one(objects, "Deployment", "ponder-gateway")
    (container,) = _containers(gateway)
    env = _env(container)
    assert env["PONDER_WORKER"]["value"] == "triton"
    service = _one(objects, "Service", "ponder-worker")
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["PONDER_TRITON_URLS"]["value"] == f"{service['metadata']['name']}:{grpc['port']}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001

    hpa = _one(objects, "HorizontalPodAutoscaler", "ponder-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ponder-gateway"
    pods_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert pods_metrics <= {"ponder_http_requests_in_flight", "ponder_queue_depth"} and pods_metrics
    pdb = _one(objects, "PodDisruptionBudget", "ponder-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]


def test_worker_requests_a_gpu_and_serves_the_repository_volume():
    objects = render(K8S / "base")
    worker = _one(objects, "Deployment", "ponder-worker")
    (container,) = _containers(worker)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(v for v in worker["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    claim = _one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadOnlyMany" in claim["spec"]["accessModes"]


def test_overlays_pin_images_and_the_production_one_requires_api_keys():
    production = render(K8S / "overlays" / "production")
    (gateway,) = _containers(_one(production, "Deployment", "ponder-gateway"))
    assert ":" in gateway["image"] and not gateway["image"].endswith(":latest")
    env = _env(gateway)
    assert env["PONDER_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert env["PONDER_ALLOW_ANONYMOUS_PUBLIC"]["value"] == "false"
    assert _one(production, "Deployment", "ponder-worker")["spec"]["replicas"] == 2

    cpu = render(K8S / "overlays" / "cpu-test")
    (worker,) = _containers(_one(cpu, "Deployment", "ponder-worker"))
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
