"""The Helm chart and the image's Dockerfile, checked without a cluster or a Docker engine.

The chart is rendered with Helm's own Go SDK (helm-python-sdk) for every combination that
changes its output: native or classic sidecar, PodMonitor on or off, the example Deployment
on or off, plus one values set that switches on every optional branch. Each rendered object
is validated strictly (unknown fields refused) against the Kubernetes 1.29, 1.30 and 1.31
OpenAPI schemas (kubernetes-validate), the chart is linted with `helm lint --strict`, the
values schema must refuse bad values, the sidecar configuration in the rendered ConfigMap
must pass `dbsidecar check-config` with the environment the container would get, and the
Dockerfile must pass hadolint. The three tools come from the `test` extra; a missing one
fails the import here instead of skipping.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from importlib.resources import files
from itertools import product
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import _native
from referencing import Registry, Resource

from sidecar import cli

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "dbsidecar"
KUBE_VERSIONS = ("1.29", "1.30", "1.31")
RELEASE, NAMESPACE = "shop", "shop"

# The only kinds validated without a Kubernetes schema (see check_pod_monitor): the
# Prometheus Operator's PodMonitor is a CRD, and kubernetes-validate ships schemas for
# Kubernetes' own APIs only. Any other kind without a schema fails the test.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}

Values = dict[str, Any]
Obj = dict[str, Any]


def merged(*layers: Values) -> Values:
    """Later layers win, maps merge key by key: what `helm -f a.yaml -f b.yaml` does."""
    out: Values = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


BASE = yaml.safe_load((CHART / "ci" / "values.yaml").read_text())
FULL = merged(BASE, yaml.safe_load((CHART / "ci" / "full-values.yaml").read_text()))


def switches(native: bool, pod_monitor: bool, example: bool) -> Values:
    return {
        "sidecar": {"native": native},
        "metrics": {"podMonitor": {"enabled": pod_monitor}},
        "example": {"enabled": example},
    }


CASES: dict[str, Values] = {
    f"{mode}{'-podmonitor' if pm else ''}{'-example' if ex else ''}": merged(
        BASE, switches(mode == "native", pm, ex)
    )
    for mode, pm, ex in product(("native", "classic"), (False, True), (False, True))
}
CASES["native-full"] = merged(FULL, switches(True, True, True))
CASES["classic-full"] = merged(FULL, switches(False, True, True))
# A ConfigMap managed elsewhere: none is rendered, and the pod must mount that one.
CASES["native-existing-configmap"] = merged(
    BASE,
    switches(True, False, True),
    {"existingConfigMap": {"name": "orders-sidecar-config", "key": "sidecar.yaml"}},
)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_raw(chart: helm.Chart, values: Values, kube_version: str) -> dict[str, str]:
    # Chart.render() in helm-python-sdk 0.2.2 has no kube_version argument, but the
    # libhelm_c function under it takes `helm template`'s options as JSON, kube_version
    # and strict (missing keys are errors, as in `helm lint --strict`) among them. Without
    # kube_version Helm renders for its built-in default, and the native sidecar's version
    # guard would go untested; test_native_mode_refuses_kubernetes_1_28 shows it is honoured.
    options = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "kube_version": f"v{kube_version}.0",
        "strict": True,
    }
    rendered = _native.call_string(
        "helm_render", chart._raw(), json.dumps(values), json.dumps(options)
    )
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def render(chart: helm.Chart, values: Values, kube_version: str) -> list[Obj]:
    return [
        obj
        for path, text in render_raw(chart, values, kube_version).items()
        if not path.endswith("NOTES.txt")
        for obj in yaml.safe_load_all(text)
        if obj
    ]


def one(objects: list[Obj], kind: str) -> Obj:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def sidecar_container(pod_spec: dict[str, Any], native: bool) -> dict[str, Any]:
    """Where the chart promises the sidecar: a native sidecar is the only init container;
    a classic one is the first container, before the app (postStart holds the app)."""
    init, containers = pod_spec.get("initContainers", []), pod_spec["containers"]
    if native:
        assert [c["name"] for c in init] == ["dbsidecar"]
        assert init[0]["restartPolicy"] == "Always"
        assert all(c["name"] != "dbsidecar" for c in containers)
        return init[0]
    assert not init
    assert containers[0]["name"] == "dbsidecar" and len(containers) == 2
    assert "restartPolicy" not in containers[0]
    return containers[0]


def check_pod_spec(deployment: Obj, native: bool) -> None:
    """What the API server refuses but an OpenAPI schema cannot see."""
    spec, template = deployment["spec"], deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = template["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    assert len({c["name"] for c in containers}) == len(containers)
    volumes = {v["name"] for v in pod["volumes"]}
    assert len(volumes) == len(pod["volumes"])
    for container in containers:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']} mounts {mount['name']}"
    sidecar = sidecar_container(pod, native)
    (port,) = sidecar["ports"]
    assert len(port["name"]) <= 15  # an IANA service name, or the API server refuses it
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"]["port"] == port["containerPort"]
    if not native:
        # The hook is a real `dbsidecar wait` command line against the real ops port.
        hook = sidecar["lifecycle"]["postStart"]["exec"]["command"]
        assert hook[0] == "dbsidecar"
        args = cli.parser().parse_args(hook[1:])
        assert args.func is cli.cmd_wait
        assert args.ops == f"http://127.0.0.1:{port['containerPort']}"
    app = pod["containers"][-1]
    assert {"name": "dbsidecar-socket", "mountPath": "/var/run/dbsidecar"} in app["volumeMounts"]


def check_config_checksum(deployment: Obj, config_map: Obj) -> None:
    """The pod template carries a hash of the configuration it mounts, so pods roll when
    it changes: it must be the hash of what the ConfigMap holds."""
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    # The ConfigMap holds the document as a YAML block scalar, which adds a final newline.
    document = config_map["data"]["config.yaml"].removesuffix("\n")
    expected = hashlib.sha256(document.encode()).hexdigest()
    assert annotations["checksum/dbsidecar-config"] == expected


def definitions(kube_version: str) -> Registry:
    root = files("kubernetes_validate") / "kubernetes-json-schema"
    doc = json.loads((root / f"v{kube_version}.0-local-strict" / "_definitions.json").read_text())
    return Registry().with_resource(doc["$id"], Resource.from_contents(doc))


def validate_definition(instance: Any, name: str, kube_version: str) -> None:
    """Validate against one of Kubernetes' own type definitions (strict variant)."""
    ref = {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{name}"}
    jsonschema.Draft202012Validator(ref, registry=definitions(kube_version)).validate(instance)


def check_pod_monitor(pod_monitor: Obj, objects: list[Obj], kube_version: str) -> None:
    """The PodMonitor, without its CRD schema: kubernetes-validate has none, and the
    Prometheus Operator's CRD cannot be fetched here. Its Kubernetes-typed parts are
    validated against Kubernetes' own definitions, its own fields are checked against the
    monitoring.coreos.com/v1 field names, and what matters most is checked across
    objects: it must select the sidecar's pods and scrape a port they declare."""
    meta = "io.k8s.apimachinery.pkg.apis.meta.v1"
    validate_definition(pod_monitor["metadata"], f"{meta}.ObjectMeta", kube_version)
    spec = pod_monitor["spec"]
    assert set(pod_monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(spec) == {"selector", "namespaceSelector", "podMetricsEndpoints"}
    validate_definition(spec["selector"], f"{meta}.LabelSelector", kube_version)
    namespaces = spec["namespaceSelector"]
    assert set(namespaces) <= {"any", "matchNames"} and namespaces
    endpoint_fields = {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= endpoint_fields | {"metricRelabelings"}
        assert endpoint["path"] == "/metrics"
    deployments = [obj for obj in objects if obj["kind"] == "Deployment"]
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert namespaces.get("any") or deployment["metadata"]["namespace"] in namespaces.get(
            "matchNames", []
        )
        ports = {
            port["name"]
            for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
            for port in container.get("ports", [])
        }
        assert {e["port"] for e in spec["podMetricsEndpoints"]} <= ports


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_renders_objects_kubernetes_accepts(
    chart: helm.Chart, case: str, kube_version: str
) -> None:
    values = CASES[case]
    objects = render(chart, values, kube_version)
    expected = {
        "ConfigMap": not values.get("existingConfigMap"),
        "Deployment": values["example"]["enabled"],
        "PodMonitor": values["metrics"]["podMonitor"]["enabled"],
    }
    assert sorted(obj["kind"] for obj in objects) == sorted(k for k, on in expected.items() if on)
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            check_pod_monitor(obj, objects, kube_version)
            continue
        # strict: the schemas without additionalProperties, so an unknown or misplaced
        # field is an error. The returned version shows no older schema stood in.
        assert kubernetes_validate.validate(obj, kube_version, strict=True) == kube_version
    if expected["Deployment"]:
        deployment = one(objects, "Deployment")
        check_pod_spec(deployment, values["sidecar"]["native"])
        if expected["ConfigMap"]:
            check_config_checksum(deployment, one(objects, "ConfigMap"))


def test_existing_configmap_is_mounted_by_name_and_key(chart: helm.Chart) -> None:
    objects = render(chart, CASES["native-existing-configmap"], "1.30")
    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (config,) = [v for v in volumes if v["name"] == "dbsidecar-config"]
    assert config["configMap"] == {
        "name": "orders-sidecar-config",
        "items": [{"key": "sidecar.yaml", "path": "config.yaml"}],
    }


def test_native_mode_refuses_kubernetes_1_28(chart: helm.Chart) -> None:
    # An API server before 1.29 drops restartPolicy from an init container, and the
    # sidecar would then hold the pod in Init forever: the chart fails at render time.
    with pytest.raises(helm.HelmRenderError, match=r"needs Kubernetes >= 1\.29"):
        render(chart, CASES["native-example"], "1.28")
    # Classic mode is the way for older clusters.
    objects = render(chart, CASES["classic-podmonitor-example"], "1.28")
    assert kubernetes_validate.validate(one(objects, "Deployment"), "1.28", strict=True) == "1.28"


def lint_findings(values: Values, kube_version: str) -> list[str]:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{kube_version}.0")
    # Severity 1 is information ("icon is recommended"); 2 and up are warnings and errors,
    # which --strict turns into failures.
    return report["errors"] + [
        f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2
    ]


@pytest.mark.parametrize("case", CASES)
def test_lint_strict_passes(case: str) -> None:
    for kube_version in KUBE_VERSIONS:
        assert lint_findings(CASES[case], kube_version) == []


def test_lint_strict_reports_bad_values() -> None:
    # The lint above would pass vacuously if findings never reached the report.
    findings = lint_findings(merged(BASE, {"sidecar": {"native": "false"}}), "1.30")
    assert any("/sidecar/native" in finding for finding in findings), findings


BAD_VALUES: dict[str, tuple[Values, str]] = {
    "empty image repository": ({"image": {"repository": ""}}, "/image/repository"),
    "tag in the repository": (
        {"image": {"repository": "registry.example.com/dbsidecar:0.1.0"}},
        "/image/repository",
    ),
    "digest not sha256": ({"image": {"digest": "latest"}}, "/image/digest"),
    "native as a string": ({"sidecar": {"native": "false"}}, "/sidecar/native"),
    "ops port as text": ({"sidecar": {"opsPort": "9432"}}, "/sidecar/opsPort"),
    "port name too long": ({"sidecar": {"opsPortName": "dbsidecar-metrics"}}, "opsPortName"),
    "unknown top-level key": ({"imagePullPolicy": "Always"}, "'imagePullPolicy' not allowed"),
    "misspelt nested key": ({"sidecar": {"clasic": {}}}, "'clasic' not allowed"),
    "misspelt probe key": (
        {"probes": {"startup": {"periodSecond": 1}}},
        "'periodSecond' not allowed",
    ),
    "liveness successThreshold": (
        {"probes": {"liveness": {"successThreshold": 2}}},
        "/probes/liveness/successThreshold",
    ),
    "wait timeout not a duration": (
        {"sidecar": {"classic": {"waitTimeout": "two minutes"}}},
        "/sidecar/classic/waitTimeout",
    ),
    "scrape interval without unit": (
        {"metrics": {"podMonitor": {"interval": "30"}}},
        "/metrics/podMonitor/interval",
    ),
    "secretEnv without key": (
        {"secretEnv": [{"name": "PW", "secretName": "db"}]},
        "/secretEnv/0",
    ),
    "env entry with a typo": ({"env": [{"name": "A", "valeu": "1"}]}, "'valeu' not allowed"),
    "negative replicas": ({"example": {"replicas": -1}}, "/example/replicas"),
    "example app key": ({"example": {"app": {"args": ["x"]}}}, "'args' not allowed"),
    "config not a mapping": ({"config": ["listen"]}, "/config"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_values_schema_refuses(chart: helm.Chart, case: str) -> None:
    overlay, where = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as refused:
        render(chart, merged(BASE, overlay), "1.30")
    assert where in str(refused.value)


def test_defaults_need_only_the_image_repository(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render(chart, {}, "1.30")
    problems = [line for line in str(refused.value).splitlines() if line.startswith("- at")]
    assert problems and all("'/image/repository'" in line for line in problems), problems
    assert render(chart, {"image": {"repository": "r.example/dbsidecar"}}, "1.30")
    # A parent chart passes `global` to its dependencies; the closed schema must take it.
    assert render(chart, merged(BASE, {"global": {"imageRegistry": "r.example"}}), "1.30")


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment the container would start with: plain values as given, values
    from Secrets as placeholders (their contents are not known offline)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"placeholder-for-{ref['name']}-{ref['key']}"
    return env


@pytest.mark.parametrize("case", ["native-example", "classic-example", "native-full"])
def test_rendered_sidecar_configuration_passes_check_config(
    chart: helm.Chart, case: str, tmp_path: Path
) -> None:
    values = CASES[case]
    objects = render(chart, values, "1.30")
    config_map, deployment = one(objects, "ConfigMap"), one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = sidecar_container(pod, values["sidecar"]["native"])
    # Follow the file the way the container will: --config in its args, the volume
    # mounted at that directory, the ConfigMap item projected to that file name.
    assert sidecar["args"][0] == "run"
    config_path = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    (item,) = [i for i in volume["configMap"]["items"] if i["path"] == config_path.name]
    document = tmp_path / config_path.name
    document.write_text(config_map["data"][item["key"]])

    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", "--config", str(document)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        # Only the container's environment: DBSIDECAR_* variables of the machine running
        # the tests must not change the verdict.
        env={"PATH": os.environ["PATH"], **container_env(sidecar)},
    )
    assert result.returncode == 0, result.stderr
    databases = values["config"]["databases"]
    shards = sum(len(db.get("shards", [])) or 1 for db in databases.values())
    assert result.stdout.strip() == f"ok: {len(databases)} databases, {shards} shards"


def test_full_values_reach_the_sidecar(chart: helm.Chart) -> None:
    """The optional branches render what they promise (schema-valid is not enough)."""
    objects = render(chart, CASES["classic-full"], "1.30")
    pod = one(objects, "Deployment")["spec"]["template"]
    sidecar, app = pod["spec"]["containers"]
    env = {item["name"]: item for item in sidecar["env"]}
    assert env["DBSIDECAR_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "dbsidecar-token"
    assert env["CONSUL_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "consul-token"
    assert env["USERS_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert sidecar["image"].endswith("@" + FULL["image"]["digest"])
    assert sidecar["ports"][0]["containerPort"] == 9500
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9500"
    app_env = {item["name"]: item for item in app["env"]}
    assert app_env["DBSIDECAR_URL"]["value"] == "http://127.0.0.1:7432"
    assert app_env["DBSIDECAR_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "dbsidecar-token"
    # The example's stand-in command polls the ops port it is told, not a fixed 9432.
    assert app_env["EXAMPLE_OPS_PORT"]["value"] == "9500"
    assert "${EXAMPLE_OPS_PORT}" in app["command"][-1]


def test_parent_chart_includes_the_sidecar(chart: helm.Chart, tmp_path: Path) -> None:
    """The recommended install: dbsidecar as a dependency, its named templates included
    in the parent's own pod spec, the ConfigMap name agreed on by both charts."""
    parent = tmp_path / "shop"
    shutil.copytree(CHART, parent / "charts" / "dbsidecar", ignore=shutil.ignore_patterns("ci"))
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop\nversion: 1.0.0\n"
        "dependencies:\n  - {name: dbsidecar, version: 0.1.0}\n"
    )
    (parent / "templates").mkdir()
    (parent / "templates" / "deployment.yaml").write_text(
        """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-api
  namespace: {{ .Release.Namespace }}
spec:
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels:
        app: api
        {{- include "dbsidecar.podLabels" . | nindent 8 }}
      annotations:
        {{- include "dbsidecar.podAnnotations" . | nindent 8 }}
    spec:
      initContainers:
        {{- include "dbsidecar.initContainers" . | nindent 8 }}
      containers:
        - name: api
          image: registry.example.com/shop/api:1.0.0
          env:
            {{- include "dbsidecar.appEnv" . | nindent 12 }}
          volumeMounts:
            {{- include "dbsidecar.appVolumeMounts" . | nindent 12 }}
      volumes:
        {{- include "dbsidecar.volumes" . | nindent 8 }}
"""
    )
    with helm.Chart.load(parent) as shop:
        objects = render(shop, {"dbsidecar": BASE, "global": {"team": "shop"}}, "1.31")
    for obj in objects:
        assert kubernetes_validate.validate(obj, "1.31", strict=True) == "1.31"
    deployment = one(objects, "Deployment")
    check_pod_spec(deployment, native=True)
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    (config,) = [v for v in volumes if v["name"] == "dbsidecar-config"]
    assert config["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    check_config_checksum(deployment, one(objects, "ConfigMap"))


def tool(name: str) -> str:
    """A console script of the test extra: next to this interpreter, else on PATH."""
    path = shutil.which(
        name, path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ["PATH"]])
    )
    assert path, f"{name} is missing: install the test extra (pip install -e '.[test]')"
    return path


def test_hadolint_passes_on_the_dockerfile(tmp_path: Path) -> None:
    # An explicit configuration and a neutral working directory, so a .hadolint.yaml or
    # HADOLINT_* variable on the machine cannot relax the check; every level fails.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [tool("hadolint"), "--config", str(config), "--format", "json", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_image_and_chart_agree() -> None:
    """Without a Docker engine the image is never built here, so what a build or a pod
    would trip over is checked across the files that must agree."""
    instructions = dockerfile_instructions()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # Every package the distribution declares is copied in, or `pip wheel .` fails.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {
        source.rstrip("/")
        for op, args in instructions
        if op == "COPY" and not args.startswith("--")
        for source in args.split()[:-1]
    }
    assert set(packages["packages"]) <= copied
    # ... and the allowlisting .dockerignore lets each of them into the build context.
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed
    # The user the image runs as is the one the chart's securityContext demands.
    (user,) = [args for op, args in instructions if op == "USER"]
    security = values["securityContext"]
    assert user == f"{security['runAsUser']}:{security['runAsGroup']}"
    # The chart's default args are the image's default command, and the port it exposes
    # is the ops port the chart probes.
    (cmd,) = [args for op, args in instructions if op == "CMD"]
    assert json.loads(cmd) == values["sidecar"]["args"]
    (entrypoint,) = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["dbsidecar"]
    assert ("EXPOSE", str(values["config"]["ops"]["port"])) in instructions


def test_image_build_imports_what_run_imports() -> None:
    """`dbsidecar run` imports the server inside the command (so `check-config` and
    `wait` stay light); the build's import check must name those modules, or a module
    broken by the image's removed pip/setuptools would pass the build and fail the pod."""
    lazy = set(re.findall(r"from \.(\w+) import", inspect.getsource(cli.cmd_run)))
    assert lazy, "cmd_run no longer imports the server lazily; simplify this test"
    (check,) = [
        args
        for op, args in dockerfile_instructions()
        if op == "RUN" and "python -c" in args and "import sidecar" in args
    ]
    imported = set(re.search(r'python -c "import ([^"]+)"', check).group(1).split(", "))
    assert {f"sidecar.{module}" for module in lazy} | {"sidecar.cli", "client"} <= imported
    assert "dbsidecar --version" in check
