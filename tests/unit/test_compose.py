"""The deployment files: compose.yml is valid Compose and lets workers scale,
its `cluster` profile stays out of the default one and its RabbitMQ nodes find
each other, and every command that the Procfiles, compose.yml and
scripts/up.sh run exists.  (Offline checks: no Docker daemon runs here.)
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
#: shared/ lies beside the repository, in a work tree and in CI's fresh clone.
COMPOSE_SPEC = REPO.parent / "shared" / "specs" / "compose-spec.json"
PROCFILES = ("Procfile", "Procfile.local")
#: Where the Procfiles' `orders` and `python` come from: the venv running the tests.
VENV_BIN = Path(sys.executable).parent
#: Seconds `orders <verb> --help` may take (it imports the whole CLI).
HELP_TIMEOUT = 60
#: The services of the `cluster` profile: three RabbitMQ nodes (and their cookie), a PostgreSQL primary and standby.
CLUSTER_SERVICES = {"rabbit-cookie", "rabbit1", "rabbit2", "rabbit3", "pg-primary", "pg-standby"}
RABBIT_NODES = ("rabbit1", "rabbit2", "rabbit3")
RABBIT_CLUSTER_CONF = "deploy/compose/rabbitmq-cluster.conf"


def load_compose() -> dict:
    return yaml.safe_load((REPO / "compose.yml").read_text(encoding="utf-8"))


def procfile(name: str) -> dict[str, str]:
    """Process name -> command of one Procfile."""
    entries = {}
    for line in (REPO / name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        process, sep, command = line.partition(":")
        assert sep and command.strip(), f"{name}: malformed line {line!r}"
        entries[process.strip()] = command.strip()
    return entries


def simple_commands(command: str) -> list[list[str]]:
    """`a x && b y` -> [["a", "x"], ["b", "y"]]."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", command) if part.strip()]


def orders_verbs(command: str) -> set[tuple[str, ...]]:
    """The `orders` sub-command paths a shell command runs (`orders products import F` -> products import)."""
    verbs = set()
    for argv in simple_commands(command):
        if argv and argv[0] == "orders":
            words = []
            for word in argv[1:]:
                if word.startswith("-") or "/" in word or "." in word:
                    break
                words.append(word)
            verbs.add(tuple(words))
    return verbs


def all_orders_commands() -> list[str]:
    commands = [cmd for name in PROCFILES for cmd in procfile(name).values()]
    for service in load_compose()["services"].values():
        command = service.get("command")
        if isinstance(command, list):
            command = command[-1] if command[:2] == ["sh", "-c"] else shlex.join(command)
        if command:
            commands.append(command)
    commands += [
        line.strip()
        for line in (REPO / "scripts" / "up.sh").read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("orders ")
    ]
    return commands


PROCESSES = [(name, process) for name in PROCFILES for process in procfile(name)]
VERBS = sorted({verb for command in all_orders_commands() for verb in orders_verbs(command)})


def test_compose_file_is_valid_against_the_compose_spec():
    if not COMPOSE_SPEC.is_file():
        pytest.fail(
            f"the Compose JSON schema is missing at {COMPOSE_SPEC}: "
            "the shared/ folder must lie beside the repository (CI puts a copy there)"
        )
    spec = json.loads(COMPOSE_SPEC.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft7Validator(spec).iter_errors(load_compose()), key=str)
    assert not errors, "compose.yml is not valid Compose:\n" + "\n".join(
        f"- {'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors
    )


def test_compose_worker_scales_and_starts_only_after_migrate_succeeded():
    services = load_compose()["services"]
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container_name stops `--scale worker=N`"
    assert "ports" not in worker, "host ports on the worker clash once it is scaled"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert {"postgres", "rabbitmq", "redis"} <= set(migrate["depends_on"])
    assert all(dep["condition"] == "service_healthy" for dep in migrate["depends_on"].values())


@pytest.mark.parametrize(
    "service", ["postgres", "rabbitmq", "redis", "worker", "shim", *RABBIT_NODES, "pg-primary", "pg-standby"]
)
def test_compose_service_has_a_healthcheck(service):
    healthcheck = load_compose()["services"][service].get("healthcheck")
    assert healthcheck and healthcheck.get("test"), f"{service} has no healthcheck"


def test_cluster_profile_services_start_only_with_the_cluster_profile():
    services = load_compose()["services"]
    assert CLUSTER_SERVICES <= set(services)
    for name, service in services.items():
        if name in CLUSTER_SERVICES:
            assert service.get("profiles") == ["cluster"], f"{name} must start only with --profile cluster"
        else:
            assert "profiles" not in service, f"{name} belongs to the default profile"
            depends = set(service.get("depends_on", ()))
            assert not depends & CLUSTER_SERVICES, f"{name} (default profile) depends on {depends & CLUSTER_SERVICES}"


def test_cluster_rabbit_nodes_list_each_other_for_classic_config_peer_discovery():
    settings = {}
    for line in (REPO / RABBIT_CLUSTER_CONF).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {value for key, value in settings.items() if key.startswith("cluster_formation.classic_config.nodes.")}

    services = load_compose()["services"]
    nodes = {f"rabbit@{services[name]['hostname']}" for name in RABBIT_NODES}
    assert listed == nodes, f"{RABBIT_CLUSTER_CONF} lists {sorted(listed)}, the nodes are {sorted(nodes)}"
    for name in RABBIT_NODES:
        volumes = services[name]["volumes"]
        assert f"./{RABBIT_CLUSTER_CONF}:/etc/rabbitmq/conf.d/20-cluster.conf:ro" in volumes, name
        assert "rabbit-cookie:/run/rabbit-cookie:ro" in volumes, f"{name} must share the Erlang cookie"
        assert services[name]["depends_on"]["rabbit-cookie"]["condition"] == "service_completed_successfully"


def test_cluster_standby_starts_after_the_primary_is_healthy():
    services = load_compose()["services"]
    assert services["pg-standby"]["depends_on"]["pg-primary"]["condition"] == "service_healthy"
    assert services["pg-standby"]["environment"]["PRIMARY_HOST"] == "pg-primary"
    assert services["pg-primary"]["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"


def test_compose_bind_mounts_exist():
    for name, service in load_compose()["services"].items():
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
        for word in service.get("entrypoint", ()):
            if word.startswith("/deploy/"):
                assert (REPO / "deploy" / "compose" / word.removeprefix("/deploy/")).is_file(), f"{name}: {word}"


def test_production_procfile_runs_no_payment_fakes_and_local_one_runs_all_processes():
    production, local = procfile("Procfile"), procfile("Procfile.local")
    assert not any("scripts/fakes" in command for command in production.values())
    assert "release" in production and "release" not in local
    for process, command in production.items():
        if process != "release":
            assert local.get(process) == command, f"Procfile.local runs {process} differently"


@pytest.mark.parametrize(("procfile_name", "process"), PROCESSES)
def test_procfile_command_executables_exist(procfile_name, process):
    for argv in simple_commands(procfile(procfile_name)[process]):
        program = argv[0]
        if program in ("orders", "python"):
            assert (VENV_BIN / program).exists(), (
                f"{procfile_name} {process}: {VENV_BIN / program} is missing (pip install -e '.[test]')"
            )
            if program == "python":
                script = REPO / argv[1]
                assert script.is_file(), f"{procfile_name} {process}: {argv[1]} does not exist"
        else:
            assert shutil.which(program), f"{procfile_name} {process}: {program} is not on PATH"


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_orders_verb_used_by_deployment_files_exists(verb):
    orders = VENV_BIN / "orders"
    assert orders.exists(), f"{orders} is missing (pip install -e '.[test]')"
    result = subprocess.run(
        [str(orders), *verb, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT,
    )
    assert result.returncode == 0, (
        f"`orders {' '.join(verb)} --help` exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
