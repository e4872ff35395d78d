"""The Kubernetes manifests in deploy/k8s, checked offline (no cluster, no broker, no database).

- Built-in kinds against the API schemas that kubernetes-validate ships, strict (an unknown
  field is an error), for the oldest Kubernetes the set is written for and the newest the
  package knows.
- KEDA's kinds against its CRDs in ../shared/specs/keda, closed the way the API server's strict
  field validation treats them (an unknown field is an error).
- What no schema knows: every command is a real ``orders`` verb with real options; the names
  the objects give each other exist; every ORDERS_* variable is a setting; the probes look at
  what the processes serve or touch; the worker's grace period covers its drain; production
  mode refuses every placeholder of secret.example.yaml and accepts the rest of the set.

Each check returns its problems as text. Every check must find nothing in the shipped set, and
each deliberately broken copy of it (in tmp_path) must make its check name the mistake.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

from schema.topology import COMMAND_QUEUES
from worker import production
from worker.settings import ENV_PREFIX, Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
#: shared/ lies beside the repository, in a work tree and in CI's fresh clone
KEDA_SPECS = REPO.parent / "shared" / "specs" / "keda"
KUSTOMIZATION = "kustomization.yaml"
#: the Secrets the set references, with placeholders; never among the kustomization's resources
EXAMPLE_SECRETS = "secret.example.yaml"
#: the file the image reads (Dockerfile: ORDERS_CONFIG=/app/config/config.yaml, a copy of this one)
IMAGE_CONFIG = REPO / "config" / "config.yaml"
#: the oldest Kubernetes the manifests are written for (PodDisruptionBudget's
#: unhealthyPodEvictionPolicy, CronJob's timeZone); the newest is what kubernetes-validate ships
OLDEST_KUBERNETES = "1.28.0"
#: the queue the autoscaler watches: new orders (docs/operations.md, "The autoscaler")
PLACE_QUEUE = "orders.place"
#: ORDERS_* variables that are read but are not settings
NOT_SETTINGS = frozenset({"ORDERS_CONFIG"})
#: secrets production mode does not judge (PostgreSQL refuses a wrong password itself)
NOT_JUDGED_BY_PRODUCTION = frozenset({"ORDERS_DATABASE__PASSWORD"})
#: what the worker's grace period must leave beyond worker.shutdown_timeout_seconds: the
#: supervisor's 0.5 s tick before it forwards SIGTERM, the kill and join of stragglers, its exit
DRAIN_MARGIN_SECONDS = 5
LOOPBACK_HOSTS = frozenset({"localhost"})
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KEDA_API = "keda.sh/"


# -- loading -------------------------------------------------------------------------------


@dataclass
class Manifests:
    directory: Path
    kustomization: dict[str, Any]
    #: (file, object) for every object the kustomization applies
    objects: list[tuple[str, dict[str, Any]]]
    #: the Secrets of secret.example.yaml, by name
    example_secrets: dict[str, dict[str, str]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for _, obj in self.objects if obj.get("kind") == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((obj for obj in self.of_kind(kind) if obj["metadata"].get("name") == name), None)


def read_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    return data


def load(directory: Path) -> Manifests:
    kustomization = read_yaml(directory / KUSTOMIZATION)[0]
    objects = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_file():
            objects += [(resource, doc) for doc in read_yaml(path)]
    examples = {}
    if (directory / EXAMPLE_SECRETS).is_file():
        examples = {
            doc["metadata"]["name"]: secret_data(doc)
            for doc in read_yaml(directory / EXAMPLE_SECRETS)
            if doc.get("kind") == "Secret"
        }
    return Manifests(directory, kustomization, objects, examples)


def ident(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# -- pods, containers, environment ---------------------------------------------------------


@dataclass
class Workload:
    owner: dict[str, Any]
    pod: dict[str, Any]  # the pod template's spec
    labels: dict[str, str]
    container: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{ident(self.owner)} container {self.container.get('name')}"


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    spec = obj.get("spec") or {}
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return spec.get("template")
    if obj.get("kind") == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    return None


def workloads(m: Manifests) -> Iterator[Workload]:
    for _, obj in m.objects:
        template = pod_template(obj)
        if template is None:
            continue
        pod = template.get("spec") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        for container in pod.get("containers") or []:
            yield Workload(obj, pod, labels, container)


def invocations(argv: list[str]) -> list[list[str]]:
    """The simple commands a container runs: its argv, or each part of ``sh -c 'a && b'``."""
    if len(argv) >= 3 and argv[0] in ("sh", "/bin/sh", "bash") and argv[1] == "-c":
        return [shlex.split(part) for part in re.split(r"&&|\|\||;", argv[2]) if part.strip()]
    return [argv]


class CliRefused(Exception):
    """The ``orders`` CLI would refuse these arguments (the message is the CLI's)."""


def click_exception() -> type[Exception]:
    """The exception class of click's usage errors: recent typer releases vendor click, older ones use it."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # an older typer
        from click.exceptions import ClickException
    return ClickException


@cache
def orders_cli() -> Any:
    from worker.cli import app

    return typer.main.get_command(app)


def orders_verb(args: list[str]) -> tuple[str, ...]:
    """The verb path of ``orders ARGS``, after parsing ARGS as the CLI would (raises CliRefused
    for an unknown verb or option, a missing argument, a value of the wrong type)."""
    command = orders_cli()
    path: list[str] = []
    args = list(args)
    while hasattr(command, "list_commands"):  # a group of verbs
        where = " ".join(["orders", *path])
        if not args:
            raise CliRefused(f"`{where}` needs a sub-command")
        name = args.pop(0)
        sub = command.get_command(typer.Context(command), name)
        if sub is None:
            raise CliRefused(f"`{where}` has no command {name!r}")
        path.append(name)
        command = sub
    try:
        with command.make_context(" ".join(["orders", *path]), args):
            pass
    except click_exception() as exc:
        raise CliRefused(exc.format_message()) from None  # type: ignore[attr-defined]
    return tuple(path)


def verbs(container: dict[str, Any]) -> list[tuple[str, ...]]:
    """The ``orders`` verbs a container runs (unparseable ones left out: check_commands reports them)."""
    found = []
    for argv in invocations(list(container.get("command") or []) + list(container.get("args") or [])):
        if argv and argv[0] == "orders":
            try:
                found.append(orders_verb(argv[1:]))
            except CliRefused:
                continue
    return found


def running(m: Manifests, verb: str, kind: str = "Deployment") -> list[Workload]:
    return [w for w in workloads(m) if w.owner.get("kind") == kind and (verb,) in verbs(w.container)]


def environment(m: Manifests, container: dict[str, Any], secrets: dict[str, dict[str, str]] | None = None) -> dict:
    """The container's environment: envFrom in order, then env (what the kubelet does).
    Secrets come from ``secrets`` (default: secret.example.yaml's)."""
    secrets = m.example_secrets if secrets is None else secrets
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            config_map = m.named("ConfigMap", source["configMapRef"]["name"]) or {}
            env.update({prefix + k: str(v) for k, v in (config_map.get("data") or {}).items()})
        if "secretRef" in source:
            env.update({prefix + k: v for k, v in secrets.get(source["secretRef"]["name"], {}).items()})
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["key"] in secrets.get(ref["name"], {}):
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
        if ref:
            data = (m.named("ConfigMap", ref["name"]) or {}).get("data") or {}
            if ref["key"] in data:
                env[var["name"]] = str(data[ref["key"]])
    return env


def settings_of(m: Manifests, container: dict[str, Any], secrets: dict[str, dict[str, str]] | None = None) -> Settings:
    """The settings the container's process reads: the image's file under its environment."""
    return load_settings(IMAGE_CONFIG, environ=environment(m, container, secrets))


def read_settings(m: Manifests, w: Workload, problems: list[str]) -> Settings | None:
    """The workload's settings, or None with the reason added to ``problems``."""
    try:
        return settings_of(m, w.container)
    except SettingsError as exc:
        problems.append(f"{w.name}: the settings do not load: {exc}")
        return None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def container_port(container: dict[str, Any], port: int | str) -> int | None:
    """A probe's or Service's port (a number or a port's name) as the container's port number."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    return next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port), None)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) selects these labels."""
    if not selector:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def strong_secrets(m: Manifests) -> dict[str, dict[str, str]]:
    """secret.example.yaml with every placeholder replaced by a value production mode accepts:
    a 64-character key, or the URL with such a password."""
    strong: dict[str, dict[str, str]] = {}
    for name, data in m.example_secrets.items():
        strong[name] = {}
        for key, value in data.items():
            token = hashlib.sha256(f"{name}/{key}".encode()).hexdigest()
            parts = urlsplit(value)
            if parts.scheme in ("amqp", "amqps") and parts.hostname:
                netloc = f"{parts.username}:{token}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
                strong[name][key] = urlunsplit(parts._replace(netloc=netloc))
            else:
                strong[name][key] = token
    return strong


# -- checks ----------------------------------------------------------------------------------


def image_name(image: str) -> str:
    """``registry:5000/order-worker:1.0@sha256:...`` -> ``registry:5000/order-worker`` (what kustomize matches)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def check_kustomization(m: Manifests) -> list[str]:
    problems = []
    resources = m.kustomization.get("resources") or []
    for resource in resources:
        if not (m.directory / resource).is_file():
            problems.append(f"{KUSTOMIZATION} lists {resource}, which does not exist")
    if EXAMPLE_SECRETS in resources:
        problems.append(f"{KUSTOMIZATION} lists {EXAMPLE_SECRETS}: its placeholders must never be applied")
    on_disk = {p.name for p in m.directory.glob("*.yaml")} - {KUSTOMIZATION, EXAMPLE_SECRETS}
    for missing in sorted(on_disk - set(resources)):
        problems.append(f"{missing} is not listed in {KUSTOMIZATION}: `kubectl apply -k` would leave it out")
    for source, obj in m.objects:
        if obj.get("kind") == "Secret":
            problems.append(f"{source}: {ident(obj)} would ship a Secret; credentials come from the cluster's own")
    namespace = m.kustomization.get("namespace")
    if not namespace:
        problems.append(f"{KUSTOMIZATION} names no namespace")
    elif m.named("Namespace", namespace) is None:
        problems.append(f"{KUSTOMIZATION}: the namespace {namespace} is not among the objects")
    images = {image["name"] for image in m.kustomization.get("images") or []}
    for w in workloads(m):
        image = w.container.get("image", "")
        if image_name(image) not in images:
            problems.append(f"{w.name}: image {image!r} is not set by the kustomization's images")
    for source, obj in m.objects:
        name = obj.get("metadata", {}).get("name", "")
        if not DNS_LABEL.match(name) or len(name) > 63:
            problems.append(f"{source}: {ident(obj)}: the name is not a DNS label")
    return problems


def check_builtin_schemas(m: Manifests, versions: tuple[str, ...] | None = None) -> list[str]:
    versions = versions or (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
    problems = []
    for source, obj in m.objects:
        if str(obj.get("apiVersion", "")).startswith(KEDA_API):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(map(str, exc.absolute_path)) or "<top>"
                problems.append(f"{source}: {ident(obj)} (Kubernetes {version}) at {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{source}: {ident(obj)}: {exc.message}")
    return problems


def closed(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields (what the API
    server's strict field validation does), except where it preserves unknown fields."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def keda_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the closed schema of every served version of KEDA's CRDs."""
    found = {}
    for path in sorted(KEDA_SPECS.glob("*.yaml")):
        crd = read_yaml(path)[0]
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                found[key] = closed(version["schema"]["openAPIV3Schema"])
    return found


def check_keda_schemas(m: Manifests) -> list[str]:
    problems = []
    for source, obj in m.objects:
        if not str(obj.get("apiVersion", "")).startswith(KEDA_API):
            continue
        schema = keda_schemas().get((obj["apiVersion"], obj.get("kind")))
        if schema is None:
            problems.append(f"{source}: {ident(obj)}: KEDA serves no {obj.get('kind')} in {obj['apiVersion']}")
            continue
        for error in sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str):
            where = "/".join(map(str, error.absolute_path)) or "<top>"
            problems.append(f"{source}: {ident(obj)} at {where}: {error.message}")
    return problems


def check_commands(m: Manifests) -> list[str]:
    problems = []
    for w in workloads(m):
        argv = list(w.container.get("command") or []) + list(w.container.get("args") or [])
        if not argv:
            problems.append(f"{w.name}: no command (the image's default would run)")
        for simple in invocations(argv):
            if not simple or simple[0] != "orders":
                problems.append(f"{w.name}: runs {shlex.join(simple)!r}, not an `orders` verb")
                continue
            try:
                orders_verb(simple[1:])
            except CliRefused as exc:
                problems.append(f"{w.name}: `{shlex.join(simple)}` is refused by the CLI: {exc}")
    for verb in ("worker", "relay", "shim"):
        if len(running(m, verb)) != 1:
            problems.append(f"expected one Deployment running `orders {verb}`, found {len(running(m, verb))}")
    release = running(m, "migrate", "Job")
    if not release or ("topology",) not in verbs(release[0].container):
        problems.append("no Job runs the release step `orders migrate && orders topology`")
    return problems


def setting_problem(name: str) -> str | None:
    """Why an ORDERS_* variable names no setting (None when it does)."""
    if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
        return None
    section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
    field_ = Settings.model_fields.get(section)
    model = getattr(field_.annotation, "model_fields", None) if field_ else None
    if field_ is None:
        return f"{name}: there is no setting {section!r}"
    if not sep:
        return f"{name}: {section} is a section; name a key as ORDERS_{section.upper()}__KEY" if model else None
    if model is None:
        return f"{name}: {section} is not a section"
    if key not in model:
        return f"{name}: the section {section} has no key {key!r} (keys: {', '.join(model)})"
    return None


def check_environment(m: Manifests) -> list[str]:
    problems = []
    for w in workloads(m):
        names = set(environment(m, w.container))
        for source in w.container.get("envFrom") or []:
            if "configMapRef" in source and m.named("ConfigMap", source["configMapRef"]["name"]) is None:
                problems.append(f"{w.name}: envFrom names ConfigMap {source['configMapRef']['name']}, not in the set")
            if "secretRef" in source and source["secretRef"]["name"] not in m.example_secrets:
                problems.append(
                    f"{w.name}: envFrom names Secret {source['secretRef']['name']}, not in {EXAMPLE_SECRETS}"
                )
        for var in w.container.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref["key"] not in m.example_secrets.get(ref["name"], {}):
                problems.append(f"{w.name}: {var['name']} reads {ref['name']}/{ref['key']}, not in {EXAMPLE_SECRETS}")
        problems += [f"{w.name}: {p}" for p in filter(None, map(setting_problem, sorted(names)))]
        settings = read_settings(m, w, problems)
        if settings is None:
            continue
        if settings.environment != "production":
            problems.append(f"{w.name}: environment is {settings.environment!r}; the manifests run in production")
    return problems


def check_production(m: Manifests) -> list[str]:
    """With real secrets, production mode accepts the set; each placeholder alone it refuses."""
    problems = []
    strong = strong_secrets(m)
    for verb in ("worker", "relay", "shim"):
        for w in running(m, verb):
            for problem in production.problems(settings_of(m, w.container, strong)):
                problems.append(f"{w.name}: with real secrets, production mode still refuses {problem.line()}")
            for secret_name in {s["secretRef"]["name"] for s in w.container.get("envFrom") or [] if "secretRef" in s}:
                for key in sorted(set(m.example_secrets.get(secret_name, {})) - NOT_JUDGED_BY_PRODUCTION):
                    mixed = copy.deepcopy(strong)
                    mixed[secret_name][key] = m.example_secrets[secret_name][key]
                    refused = {p.variable for p in production.problems(settings_of(m, w.container, mixed))}
                    if setting_problem(key) is None and key not in refused:
                        problems.append(
                            f"{EXAMPLE_SECRETS}: the placeholder of {secret_name}/{key} would run in "
                            "production; use one production mode refuses (a development value or an empty password)"
                        )
    return sorted(set(problems))


def check_worker(m: Manifests) -> list[str]:
    problems = []
    for w in running(m, "worker"):
        settings = read_settings(m, w, problems)
        if settings is None:
            continue
        drain = settings.worker.shutdown_timeout_seconds
        grace = w.pod.get("terminationGracePeriodSeconds", 30)
        if grace < drain + DRAIN_MARGIN_SECONDS:
            problems.append(
                f"{w.name}: terminationGracePeriodSeconds {grace} < worker.shutdown_timeout_seconds {drain:g} "
                f"+ {DRAIN_MARGIN_SECONDS}: the kubelet would kill the pool mid-drain"
            )
        liveness_file = settings.worker.liveness_file
        probe = w.container.get("livenessProbe") or {}
        if "exec" not in probe:
            problems.append(f"{w.name}: the liveness probe must check the age of {liveness_file} (exec)")
        for kind in ("livenessProbe", "startupProbe", "readinessProbe"):
            command = " ".join((w.container.get(kind) or {}).get("exec", {}).get("command") or [])
            if command and liveness_file not in command:
                problems.append(f"{w.name}: {kind} does not look at worker.liveness_file {liveness_file}")
        for argv in invocations(list(w.container.get("command") or [])):
            queues = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--queue", "-q")]
            if queues and PLACE_QUEUE not in queues:
                problems.append(f"{w.name}: does not consume {PLACE_QUEUE}, the queue it is scaled on")
    return problems


def check_autoscaling(m: Manifests) -> list[str]:
    problems = []
    scaled = m.of_kind("ScaledObject")
    workers = {ident(w.owner): w for w in running(m, "worker")}
    if not scaled:
        problems.append("no ScaledObject scales the worker pool")
    for obj in scaled:
        spec = obj.get("spec") or {}
        target = spec.get("scaleTargetRef") or {}
        kind, name = target.get("kind", "Deployment"), target.get("name")
        if target.get("apiVersion", "apps/v1") != "apps/v1" or kind != "Deployment":
            problems.append(f"{ident(obj)}: scaleTargetRef must be an apps/v1 Deployment, not {kind}")
        deployment = m.named("Deployment", name or "")
        if deployment is None:
            problems.append(f"{ident(obj)}: scaleTargetRef names Deployment {name!r}, which is not in the set")
        elif ident(deployment) not in workers:
            problems.append(f"{ident(obj)}: scales {ident(deployment)}, which does not run `orders worker`")
        elif "replicas" in deployment["spec"]:
            problems.append(
                f"{ident(deployment)}: sets replicas, which every `kubectl apply` would put back over the autoscaler's"
            )
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount")
        if low < 1:
            problems.append(
                f"{ident(obj)}: minReplicaCount {low}: the pool also consumes orders.cancel, "
                "orders.payment-confirmed and orders.payments, which must never be left without a consumer"
            )
        if high is None or high < low:
            problems.append(f"{ident(obj)}: maxReplicaCount must be given and at least minReplicaCount")
        triggers = spec.get("triggers") or []
        if not any(t.get("type") == "rabbitmq" for t in triggers):
            problems.append(f"{ident(obj)}: no rabbitmq trigger")
        for trigger in triggers:
            if trigger.get("type") != "rabbitmq":
                continue
            meta = trigger.get("metadata") or {}
            queue = meta.get("queueName")
            if queue != PLACE_QUEUE or PLACE_QUEUE not in COMMAND_QUEUES:
                problems.append(f"{ident(obj)}: scales on queue {queue!r}; the contract's queue is {PLACE_QUEUE}")
            if meta.get("mode") != "QueueLength":
                problems.append(f"{ident(obj)}: mode {meta.get('mode')!r}; the pool is scaled on QueueLength")
            for key, least in (("value", 1.0), ("activationValue", 0.0)):
                try:
                    ok = float(meta[key]) >= least
                except (KeyError, TypeError, ValueError):
                    ok = False
                if not ok:
                    problems.append(f"{ident(obj)}: {key} {meta.get(key)!r} is not a number >= {least:g}")
            if any(k in meta for k in ("host", "hostFromEnv", "username", "password")):
                problems.append(
                    f"{ident(obj)}: the broker's address and credentials belong in the TriggerAuthentication"
                )
            ref = trigger.get("authenticationRef") or {}
            auth = m.named(ref.get("kind", "TriggerAuthentication"), ref.get("name", ""))
            if auth is None:
                problems.append(f"{ident(obj)}: authenticationRef names {ref.get('name')!r}, which is not in the set")
                continue
            refs = {r.get("parameter"): r for r in (auth.get("spec") or {}).get("secretTargetRef") or []}
            host = refs.get("host")
            if host is None:
                problems.append(f"{ident(auth)}: no secretTargetRef for the parameter host (the AMQP URL)")
            elif host.get("key") not in m.example_secrets.get(host.get("name"), {}):
                problems.append(
                    f"{ident(auth)}: host reads {host.get('name')}/{host.get('key')}, not in {EXAMPLE_SECRETS}"
                )
    return problems


@cache
def shim_app() -> Any:
    from worker.shim.app import create_app

    return create_app(load_settings(IMAGE_CONFIG, environ={"ORDERS_ENVIRONMENT": "development"}))


def shim_serves(path: str, method: str = "GET") -> bool:
    """Whether a request for ``path`` reaches one of the shim's endpoints (Starlette's own matching)."""
    from starlette.routing import Match

    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in shim_app().routes)


def check_shim(m: Manifests) -> list[str]:
    problems = []
    for w in running(m, "shim"):
        settings = read_settings(m, w, problems)
        if settings is None:
            continue
        if is_loopback(settings.shim.host):
            problems.append(f"{w.name}: shim.host {settings.shim.host} is unreachable from the Service and the kubelet")
        for kind, wanted in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            probe = (w.container.get(kind) or {}).get("httpGet")
            if probe is None:
                problems.append(f"{w.name}: {kind} must be an httpGet of {wanted}")
                continue
            path = probe.get("path", "/").split("?")[0]
            if not shim_serves(path):
                problems.append(f"{w.name}: {kind} asks for {path}, which the shim does not serve")
            elif path != wanted:
                problems.append(f"{w.name}: {kind} asks for {path}; it is {wanted}")
            port = container_port(w.container, probe.get("port", 80))
            if port != settings.shim.port:
                problems.append(f"{w.name}: {kind} probes port {port}; the shim listens on {settings.shim.port}")
        replicas = w.owner["spec"].get("replicas", 1)
        share = settings.shim.rate_limit_share_of
        if share != replicas * settings.shim.workers:
            problems.append(
                f"{w.name}: shim.rate_limit_processes {share} != replicas {replicas} x shim.workers "
                f"{settings.shim.workers}: with Redis down the rate limits would be off by that factor"
            )
    for service in m.of_kind("Service"):
        targets = [w for w in workloads(m) if selects({"matchLabels": service["spec"].get("selector")}, w.labels)]
        if not targets:
            problems.append(f"{ident(service)}: its selector matches no pod")
        for port in service["spec"].get("ports") or []:
            for w in targets:
                if container_port(w.container, port.get("targetPort", port["port"])) is None:
                    problems.append(f"{ident(service)}: targetPort {port.get('targetPort')} is no port of {w.name}")
    return problems


def check_relay(m: Manifests) -> list[str]:
    problems = []
    for w in running(m, "relay"):
        settings = read_settings(m, w, problems)
        if settings is None:
            continue
        if w.owner["spec"].get("replicas", 1) < 2:
            problems.append(f"{w.name}: one relay has no standby to take over; run 2")
        probe = w.container.get("livenessProbe")
        if not probe:
            problems.append(f"{w.name}: no liveness probe")
            continue
        network = probe.get("httpGet") or probe.get("tcpSocket")
        if network is not None:
            port = container_port(w.container, network.get("port", 0))
            if port != settings.metrics.port + 1:
                problems.append(
                    f"{w.name}: the liveness probe asks port {port}; the relay serves metrics.port + 1 = "
                    f"{settings.metrics.port + 1}"
                )
            if is_loopback(settings.metrics.host):
                problems.append(f"{w.name}: metrics.host {settings.metrics.host} is unreachable for the kubelet")
    return problems


def check_references(m: Manifests) -> list[str]:
    problems = []
    templates = [
        (ident(obj), (pod_template(obj) or {}).get("metadata", {}).get("labels") or {}) for _, obj in m.objects
    ]
    for pdb in m.of_kind("PodDisruptionBudget"):
        matched = [owner for owner, labels in templates if selects(pdb["spec"].get("selector") or {}, labels)]
        if len(matched) != 1:
            problems.append(f"{ident(pdb)}: its selector matches {len(matched)} workloads ({', '.join(matched)})")
    for verb in ("worker", "shim"):
        for w in running(m, verb):
            if not any(selects(p["spec"].get("selector") or {}, w.labels) for p in m.of_kind("PodDisruptionBudget")):
                problems.append(f"{w.name}: no PodDisruptionBudget covers it")
    for policy in m.of_kind("NetworkPolicy"):
        chosen = [w for w in workloads(m) if selects(policy["spec"].get("podSelector") or {}, w.labels)]
        if not chosen:
            problems.append(f"{ident(policy)}: its podSelector matches no pod")
        for rule in policy["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                for w in chosen:
                    if container_port(w.container, port.get("port", 0)) is None:
                        problems.append(f"{ident(policy)}: {w.name} has no port {port.get('port')}")
    return problems


def check_hardening(m: Manifests) -> list[str]:
    problems = []
    for w in workloads(m):
        resources = w.container.get("resources") or {}
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (resources.get(bound) or {}):
                    problems.append(f"{w.name}: no {resource} in resources.{bound}")
        pod_ctx, ctx = w.pod.get("securityContext") or {}, w.container.get("securityContext") or {}
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            problems.append(f"{w.name}: runAsNonRoot is not set")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{w.name}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{w.name}: capabilities are not all dropped")
        if w.pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{w.name}: mounts a service account token it never uses")
        if ctx.get("readOnlyRootFilesystem"):
            mounts = {v.get("mountPath") for v in w.container.get("volumeMounts") or []}
            # the liveness file, the pool's metrics samples (tempfile) and Python's temporary files
            if "/tmp" not in mounts:
                problems.append(f"{w.name}: the root filesystem is read-only but /tmp is not a volume")
    return problems


CHECKS: list[Callable[[Manifests], list[str]]] = [
    check_kustomization,
    check_builtin_schemas,
    check_keda_schemas,
    check_commands,
    check_environment,
    check_production,
    check_worker,
    check_autoscaling,
    check_shim,
    check_relay,
    check_references,
    check_hardening,
]


# -- the shipped set ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Manifests:
    for needed in (K8S / KUSTOMIZATION, K8S / EXAMPLE_SECRETS):
        assert needed.is_file(), f"{needed} is missing"
    if not KEDA_SPECS.is_dir():
        pytest.fail(
            f"KEDA's CRDs are missing at {KEDA_SPECS}: the shared/ folder must lie beside the repository "
            "(CI puts a copy there)"
        )
    return load(K8S)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_shipped_manifests_pass(shipped, check):
    problems = check(shipped)
    assert not problems, "\n".join(problems)


def test_the_set_has_what_the_service_needs(shipped):
    kinds = sorted(ident(obj) for _, obj in shipped.objects)
    for wanted in (
        "Deployment/orders-worker",
        "Deployment/orders-relay",
        "Deployment/orders-shim",
        "Job/orders-release",
        "ScaledObject/orders-worker",
        "TriggerAuthentication/orders-rabbitmq",
        "PodDisruptionBudget/orders-worker",
        "PodDisruptionBudget/orders-shim",
    ):
        assert wanted in kinds, f"{wanted} is missing from {kinds}"
    assert shipped.named("Deployment", "orders-relay")["spec"]["replicas"] == 2
    audit = pod_template(shipped.named("CronJob", "orders-audit"))["spec"]["containers"][0]
    assert verbs(audit) == [("audit",)]
    assert len(keda_schemas()) == 2, "both KEDA CRDs (ScaledObject, TriggerAuthentication) are read"


# -- deliberately broken copies -----------------------------------------------------------------

Docs = dict[str, list[dict[str, Any]]]


def find(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    return next(d for file in docs.values() for d in file if d.get("kind") == kind and d["metadata"]["name"] == name)


def container_of(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    obj = find(docs, kind, name)
    return (pod_template(obj) or {})["spec"]["containers"][0]


def set_env(docs: Docs, name: str, variable: str, value: str) -> None:
    env = container_of(docs, "Deployment", name).setdefault("env", [])
    env[:] = [v for v in env if v["name"] != variable] + [{"name": variable, "value": value}]


def scaled(docs: Docs) -> dict[str, Any]:
    return find(docs, "ScaledObject", "orders-worker")["spec"]


def trigger_meta(docs: Docs) -> dict[str, Any]:
    return scaled(docs)["triggers"][0]["metadata"]


def config(docs: Docs) -> dict[str, Any]:
    return find(docs, "ConfigMap", "orders-config")["data"]


def example_secret(docs: Docs) -> dict[str, Any]:
    return find(docs, "Secret", "orders-secrets")["stringData"]


def probe(docs: Docs, name: str, kind: str) -> dict[str, Any]:
    return container_of(docs, "Deployment", name)[kind]


BROKEN: list[tuple[str, Callable[[Docs], Any], Callable[[Manifests], list[str]], str]] = [
    # (what is broken, how, which check must see it, what its problem says)
    (
        "an unknown verb",
        lambda d: container_of(d, "Deployment", "orders-worker").update(command=["orders", "wroker"]),
        check_commands,
        "wroker",
    ),
    (
        "an unknown option",
        lambda d: container_of(d, "CronJob", "orders-audit").update(command=["orders", "audit", "--jsn"]),
        check_commands,
        "--jsn",
    ),
    (
        "a release step with a misspelt verb",
        lambda d: container_of(d, "Job", "orders-release").update(
            command=["sh", "-c", "orders migrate && orders topolgy"]
        ),
        check_commands,
        "topolgy",
    ),
    (
        "a ScaledObject on a Deployment that is not there",
        lambda d: scaled(d)["scaleTargetRef"].update(name="orders-workers"),
        check_autoscaling,
        "orders-workers",
    ),
    (
        "a ScaledObject on the shim",
        lambda d: scaled(d)["scaleTargetRef"].update(name="orders-shim"),
        check_autoscaling,
        "does not run `orders worker`",
    ),
    ("another queue", lambda d: trigger_meta(d).update(queueName="orders.places"), check_autoscaling, "orders.places"),
    (
        "a TriggerAuthentication that is not there",
        lambda d: scaled(d)["triggers"][0]["authenticationRef"].update(name="orders-rabbit"),
        check_autoscaling,
        "orders-rabbit",
    ),
    ("scaling to zero", lambda d: scaled(d).update(minReplicaCount=0), check_autoscaling, "minReplicaCount 0"),
    (
        "replicas on the autoscaled Deployment",
        lambda d: find(d, "Deployment", "orders-worker")["spec"].update(replicas=3),
        check_autoscaling,
        "sets replicas",
    ),
    (
        "credentials in the trigger",
        lambda d: trigger_meta(d).update(host="amqp://orders-keda:secret@rabbitmq:5672/orders"),
        check_autoscaling,
        "TriggerAuthentication",
    ),
    ("a trigger value as a number", lambda d: trigger_meta(d).update(value=4000), check_keda_schemas, "not of type"),
    ("an unknown ScaledObject field", lambda d: scaled(d).update(minReplicas=2), check_keda_schemas, "minReplicas"),
    (
        "an unknown container field",
        lambda d: container_of(d, "Deployment", "orders-worker").update(comand=["orders", "worker"]),
        check_builtin_schemas,
        "comand",
    ),
    (
        "replicas as a string",
        lambda d: find(d, "Deployment", "orders-shim")["spec"].update(replicas="3"),
        check_builtin_schemas,
        "not of type",
    ),
    (
        "a misspelt section",
        lambda d: config(d).update(ORDERS_DATABSE__HOST="db"),
        check_environment,
        "ORDERS_DATABSE__HOST",
    ),
    (
        "a misspelt key",
        lambda d: set_env(d, "orders-worker", "ORDERS_WORKER__LIVENES_FILE", "/tmp/x"),
        check_environment,
        "ORDERS_WORKER__LIVENES_FILE",
    ),
    (
        "a malformed value",
        lambda d: config(d).update(ORDERS_DATABASE__PORT="postgres"),
        check_environment,
        "database.port",
    ),
    ("development mode", lambda d: config(d).update(ORDERS_ENVIRONMENT="development"), check_environment, "production"),
    (
        "a placeholder production mode would accept",
        lambda d: example_secret(d).update(
            ORDERS_SHIM__JWT_SECRET="REPLACE-THIS-WITH-A-RANDOM-KEY-OF-32-BYTES-OR-MORE"
        ),
        check_production,
        "orders-secrets/ORDERS_SHIM__JWT_SECRET",
    ),
    (
        "a non-provider payment URL",
        lambda d: config(d).update(ORDERS_STRIPE__API_BASE="http://stripe-mock:12111"),
        check_production,
        "stripe.api_base",
    ),
    (
        "a readiness path the shim does not serve",
        lambda d: probe(d, "orders-shim", "readinessProbe")["httpGet"].update(path="/ready"),
        check_shim,
        "/ready",
    ),
    (
        "a liveness probe on the readiness path",
        lambda d: probe(d, "orders-shim", "livenessProbe")["httpGet"].update(path="/readyz"),
        check_shim,
        "it is /healthz",
    ),
    (
        "a shim bound to loopback",
        lambda d: set_env(d, "orders-shim", "ORDERS_SHIM__HOST", "127.0.0.1"),
        check_shim,
        "unreachable",
    ),
    (
        "replicas out of step with the rate limits' share",
        lambda d: find(d, "Deployment", "orders-shim")["spec"].update(replicas=4),
        check_shim,
        "rate_limit_processes",
    ),
    (
        "a grace period shorter than the drain",
        lambda d: (pod_template(find(d, "Deployment", "orders-worker")) or {})["spec"].update(
            terminationGracePeriodSeconds=30
        ),
        check_worker,
        "terminationGracePeriodSeconds 30",
    ),
    (
        "a drain timeout raised past the grace period",
        lambda d: set_env(d, "orders-worker", "ORDERS_WORKER__SHUTDOWN_TIMEOUT_SECONDS", "60"),
        check_worker,
        "mid-drain",
    ),
    (
        "a liveness file the probes do not read",
        lambda d: set_env(d, "orders-worker", "ORDERS_WORKER__LIVENESS_FILE", "/tmp/pool.alive"),
        check_worker,
        "/tmp/pool.alive",
    ),
    (
        "a pool that does not consume orders.place",
        lambda d: container_of(d, "Deployment", "orders-worker").update(
            command=["orders", "worker", "--queue", "orders.payments"]
        ),
        check_worker,
        "does not consume orders.place",
    ),
    (
        "a relay probe on the pool's metrics port",
        lambda d: container_of(d, "Deployment", "orders-relay")["ports"][0].update(containerPort=9400),
        check_relay,
        "metrics.port + 1",
    ),
    (
        "a PodDisruptionBudget that selects nothing",
        lambda d: find(d, "PodDisruptionBudget", "orders-worker")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "workers"}
        ),
        check_references,
        "matches 0 workloads",
    ),
    (
        "no /tmp on a read-only root filesystem",
        lambda d: container_of(d, "Deployment", "orders-worker").pop("volumeMounts"),
        check_hardening,
        "/tmp is not a volume",
    ),
    (
        "no memory limit",
        lambda d: container_of(d, "Deployment", "orders-relay")["resources"]["limits"].pop("memory"),
        check_hardening,
        "no memory in resources.limits",
    ),
    (
        "the example Secret in the kustomization",
        lambda d: d[KUSTOMIZATION][0]["resources"].append(EXAMPLE_SECRETS),
        check_kustomization,
        "placeholders must never be applied",
    ),
]


@pytest.mark.parametrize(("broken", "mutate", "check", "expected"), BROKEN, ids=[case[0] for case in BROKEN])
def test_a_broken_copy_is_caught(tmp_path, broken, mutate, check, expected):
    shutil.copytree(K8S, tmp_path, dirs_exist_ok=True)
    docs: Docs = {path.name: read_yaml(path) for path in tmp_path.glob("*.yaml")}
    before = copy.deepcopy(docs)
    mutate(docs)
    assert docs != before, f"the case {broken!r} changed nothing"
    for name, file_docs in docs.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(file_docs, sort_keys=False), encoding="utf-8")
    problems = check(load(tmp_path))
    assert any(expected in problem for problem in problems), f"{check.__name__} missed {broken}; it said:\n" + (
        "\n".join(problems) or "(nothing)"
    )
    assert not check(load(K8S)), "the shipped set itself must pass the same check"


def test_kubernetes_validate_refuses_what_the_api_server_would(shipped):
    """The strict schemas are what makes an unknown field an error (the sanity of the tool itself)."""
    worker = copy.deepcopy(shipped.named("Deployment", "orders-worker"))
    kubernetes_validate.validate(worker, OLDEST_KUBERNETES, strict=True)
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, OLDEST_KUBERNETES, strict=True)


def test_settings_variables_are_recognised_as_such():
    assert setting_problem("ORDERS_WORKER__LIVENESS_FILE") is None
    assert setting_problem("ORDERS_ENVIRONMENT") is None
    assert setting_problem("ORDERS_CONFIG") is None
    assert "no key" in (setting_problem("ORDERS_WORKER__LIVENESS") or "")
    assert "is a section" in (setting_problem("ORDERS_WORKER") or "")
    assert "no setting" in (setting_problem("ORDERS_UPSTREAM_PASSWORD") or "")
