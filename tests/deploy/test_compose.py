"""docker-compose.yml, .env.example and docker/ checked offline.

There is no Docker engine here, so nothing is started. ``docker-compose config`` (Debian's
docker-compose 1.29: ``apt-get install -y --no-install-recommends docker-compose``) validates
the file against the Compose schema and interpolates it with a .env built from .env.example;
the resolved file is then checked for the structure the stack relies on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from backend.queues import TASK_QUEUES, Queue

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
HEALTHCHECK_SCRIPT = REPO_ROOT / "docker" / "healthcheck.py"
CONSTRAINTS = REPO_ROOT / "constraints.txt"

INSTALL_HINT = "apt-get install -y --no-install-recommends docker-compose"
REQUIRED_SECRETS = ("POSTGRES_PASSWORD", "PREFLOOP_ADMIN_PASSWORD", "PREFLOOP_SECRET_KEY")
GPU_WORKERS = {"worker-train": Queue.TRAIN, "worker-sample": Queue.SAMPLE}
SERVICES = {"postgres", "redis", "migrate", "api", *GPU_WORKERS, "worker-cpu", "beat"}
APP_SERVICES = {"migrate", "api", *GPU_WORKERS, "worker-cpu", "beat"}
SHARED_DATA_SERVICES = {"api", *GPU_WORKERS, "worker-cpu", "beat"}

# `NAME=value` or `# NAME=value` (documented, commented out) at the start of a line.
_ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
# ${NAME}, ${NAME:-default}, ${NAME:?message}, $NAME; `$$` is a literal dollar.
_COMPOSE_VAR = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")


def env_example_variables() -> dict[str, tuple[str, bool]]:
    """name -> (example value, active) for every variable .env.example documents."""
    found: dict[str, tuple[str, bool]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            commented, name, value = match.groups()
            found[name] = (value, commented is None)
    return found


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def compose_variables() -> set[str]:
    """Every variable the compose file interpolates (comments aside)."""
    parsed = yaml.safe_load(COMPOSE_FILE.read_text())
    return {a or b for text in _strings(parsed) for a, b in _COMPOSE_VAR.findall(text)}


def write_env_file(path: Path, **overrides: str) -> Path:
    """A .env from .env.example: its active lines, required blanks filled, then ``overrides``."""
    values = {
        name: value or f"test-{name.lower().replace('_', '-')}-{'x' * 32}"
        for name, (value, active) in env_example_variables().items()
        if active
    }
    values.update(overrides)
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


@pytest.fixture
def docker_compose(unavailable: Callable[[str], NoReturn]) -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        unavailable(f"docker-compose is not installed (Debian: `{INSTALL_HINT}`)")
    return binary


def run_config(binary: str, env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: variables of the calling shell would win over the .env file.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config", *args],
        cwd=env_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def resolved(docker_compose: str, tmp_path: Path) -> dict[str, Any]:
    """The compose file as docker-compose resolves it, with .env from .env.example."""
    result = run_config(docker_compose, write_env_file(tmp_path / ".env"))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def mounts(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(source, target) of each volume of a resolved service (short or long syntax)."""
    out = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out.add((source, target))
    return out


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def command_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(a) for a in command]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- docker-compose config ---------------------------------------------------------------------


def test_compose_file_is_valid(docker_compose: str, tmp_path: Path) -> None:
    result = run_config(docker_compose, write_env_file(tmp_path / ".env"), "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("variable", REQUIRED_SECRETS)
def test_missing_secret_stops_compose_with_its_name(
    docker_compose: str, tmp_path: Path, variable: str
) -> None:
    result = run_config(docker_compose, write_env_file(tmp_path / ".env", **{variable: ""}), "-q")
    assert result.returncode != 0
    assert f"Set {variable} in .env" in result.stderr + result.stdout


def test_services_and_volumes(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == SERVICES
    assert set(resolved["volumes"]) == {"pgdata", "redisdata", "artifacts"}
    for name, spec in resolved["volumes"].items():
        assert not (spec or {}).get("external"), f"volume {name} must be managed by compose"


def test_postgres_and_redis(resolved: dict[str, Any]) -> None:
    postgres, redis = resolved["services"]["postgres"], resolved["services"]["redis"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in healthcheck_command(postgres)
    assert ("pgdata", "/var/lib/postgresql/data") in mounts(postgres)
    assert redis["image"].startswith("redis:7")
    assert "redis-cli ping" in healthcheck_command(redis)
    assert ("redisdata", "/data") in mounts(redis)
    assert "ports" not in postgres and "ports" not in redis, "keep the data stores internal"


def test_migrate_is_one_shot_after_postgres(resolved: dict[str, Any]) -> None:
    migrate = resolved["services"]["migrate"]
    assert command_args(migrate) == ["prefloop", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_app_services_wait_for_data_stores_and_migration(resolved: dict[str, Any]) -> None:
    for name in SHARED_DATA_SERVICES:
        depends_on = resolved["services"][name]["depends_on"]
        assert depends_on["postgres"]["condition"] == "service_healthy", name
        assert depends_on["redis"]["condition"] == "service_healthy", name
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name


def test_api(resolved: dict[str, Any]) -> None:
    api = resolved["services"]["api"]
    assert command_args(api) == ["prefloop", "serve"]
    assert "prefloop-healthcheck" in healthcheck_command(api)
    assert api["environment"]["PREFLOOP_HOST"] == "0.0.0.0"
    (port,) = api["ports"]
    published = port["published"] if isinstance(port, dict) else port.split(":")[0]
    target = port["target"] if isinstance(port, dict) else port.split(":")[1]
    assert str(published) == str(target) == str(api["environment"]["PREFLOOP_PORT"]) == "8000"


def test_port_comes_from_env(docker_compose: str, tmp_path: Path) -> None:
    env_file = write_env_file(tmp_path / ".env", PREFLOOP_PORT="9123")
    result = run_config(docker_compose, env_file)
    assert result.returncode == 0, result.stderr
    api = yaml.safe_load(result.stdout)["services"]["api"]
    assert str(api["environment"]["PREFLOOP_PORT"]) == "9123"
    assert str(api["ports"][0]["published"]) == "9123"


def test_workers_and_beat(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name, queue in GPU_WORKERS.items():
        gpu = command_args(services[name])
        assert gpu[:4] == ["celery", "-A", "worker.celery_app", "worker"], name
        # One model queue per service: a round never holds up the pool's refills.
        assert option(gpu, "-Q") == queue.value, name
        assert option(gpu, "--concurrency") == "1", name
        assert option(gpu, "--prefetch-multiplier") == "1", name
        assert services[name]["build"]["target"] == "worker-gpu", name
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["count"] == 1
        assert device["capabilities"] == ["gpu"]

    cpu = command_args(services["worker-cpu"])
    assert cpu[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert option(cpu, "-Q") == Queue.CPU.value
    assert "deploy" not in services["worker-cpu"]

    consumed = {
        queue
        for s in (*GPU_WORKERS, "worker-cpu")
        for queue in option(command_args(services[s]), "-Q").split(",")
    }
    assert consumed == {q.value for q in Queue}, "every queue needs a worker"
    assert set(TASK_QUEUES.values()) <= set(Queue)

    assert command_args(services["beat"])[:4] == ["celery", "-A", "worker.celery_app", "beat"]


def test_app_services_share_settings_and_artifacts(resolved: dict[str, Any]) -> None:
    env_values = {name: value for name, (value, _) in env_example_variables().items()}
    for name in APP_SERVICES:
        env = resolved["services"][name]["environment"]
        assert env["PREFLOOP_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["PREFLOOP_DATABASE_URL"], name
        assert env["PREFLOOP_BROKER_URL"].startswith("redis://redis:6379/"), name
        assert env["PREFLOOP_RESULT_BACKEND"].startswith("redis://redis:6379/"), name
        assert env["PREFLOOP_ADMIN_PASSWORD"].startswith("test-prefloop-admin-password-"), name
        assert env["PREFLOOP_SECRET_KEY"].startswith("test-prefloop-secret-key-"), name
        assert env["PREFLOOP_BASE_MODEL"] == env_values["PREFLOOP_BASE_MODEL"], name
    for name in SHARED_DATA_SERVICES:
        service = resolved["services"][name]
        data_dir = service["environment"]["PREFLOOP_DATA_DIR"]
        assert ("artifacts", data_dir) in mounts(service), name


def test_build_targets_exist_in_dockerfile(resolved: dict[str, Any]) -> None:
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I))
    for name in APP_SERVICES:
        build = resolved["services"][name]["build"]
        assert Path(build["context"]).resolve() == REPO_ROOT, name
        assert build["dockerfile"] == "docker/Dockerfile", name
        assert build["target"] in stages, name
        if build["target"] == "api":  # the API image installs no torch
            assert "TORCH_INDEX_URL" not in build.get("args", {}), name
        else:
            assert build["args"]["TORCH_INDEX_URL"].startswith("https://"), name
    gpu_index = resolved["services"]["worker-train"]["build"]["args"]["TORCH_INDEX_URL"]
    assert re.search(r"/cu12\d+$", gpu_index), gpu_index
    cpu_index = resolved["services"]["worker-cpu"]["build"]["args"]["TORCH_INDEX_URL"]
    assert cpu_index.endswith("/cpu")


# --- the raw files -----------------------------------------------------------------------------


def test_compose_file_follows_current_spec() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in raw, "the Compose specification has no top-level version"
    assert set(raw) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        key for key in raw if key.startswith("x-")
    }


def test_every_compose_variable_is_documented() -> None:
    documented = env_example_variables()
    used = compose_variables()
    assert used, "the compose file should be configurable from .env"
    assert sorted(used - set(documented)) == []
    # And nothing active in .env.example is dead: each active line feeds the compose file.
    active = {name for name, (_, is_active) in documented.items() if is_active}
    assert sorted(active - used) == []


def test_required_secrets_are_blank_in_example() -> None:
    documented = env_example_variables()
    for name in REQUIRED_SECRETS:
        value, active = documented[name]
        assert active and value == "", f"{name} must be an active, empty line in .env.example"
        assert re.search(rf"\${{{name}:\?[^}}]+}}", COMPOSE_FILE.read_text()), name


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
    assert {"api", "worker-cpu", "worker-gpu"} <= stages
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    (torch_pin,) = [
        line.strip() for line in CONSTRAINTS.read_text().splitlines() if line.startswith("torch==")
    ]
    installs = re.findall(r"pip install (torch==\S+) --index-url \"\$\{TORCH_INDEX_URL\}\"", text)
    assert installs and set(installs) == {torch_pin}
    # Each torch install is followed by the worker extra; the API's deps stage has no torch.
    project_installs = re.findall(
        r'^\s+pip install -c constraints\.txt "\.\[worker\]"$', text, re.M
    )
    assert len(project_installs) == len(installs)
    api_deps = re.search(r"^FROM\s+\S+\s+AS\s+deps-api\b(.*?)^FROM", text, re.M | re.S)
    assert api_deps is not None
    assert '".[api,ui]"' in api_deps.group(1) and "torch" not in api_deps.group(1)
    assert re.search(r"^COPY --from=deps-api /opt/venv /opt/venv$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and all(user not in {"root", "0"} for user in users)
    api_from = re.search(r"^FROM\s+\S+\s+AS\s+api\b", text, re.M | re.I)
    assert api_from is not None
    api_stage = text[api_from.start() :]
    assert "HEALTHCHECK" in api_stage and "prefloop-healthcheck" in api_stage


def test_dockerignore_keeps_state_and_secrets_out() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var", ".env"} <= patterns
    for needed in ("docker", "constraints.txt", "pyproject.toml", "backend", "worker"):
        assert needed not in patterns


# --- docker/healthcheck.py ---------------------------------------------------------------------


@pytest.fixture
def healthz_server() -> Iterator[tuple[int, dict[str, int]]]:
    """A local HTTP server whose /healthz answers the status in ``state["status"]``."""
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            code = state["status"] if self.path == "/healthz" else 404
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], state
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "PREFLOOP_PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthcheck_script(healthz_server: tuple[int, dict[str, int]]) -> None:
    port, state = healthz_server
    assert run_healthcheck(port).returncode == 0
    state["status"] = 503
    failed = run_healthcheck(port)
    assert failed.returncode == 1 and "503" in failed.stderr
    state["status"] = 200
    assert run_healthcheck(port).returncode == 0


def test_healthcheck_script_fails_when_nothing_listens() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as server:
        port = server.server_address[1]  # a port that was free; closed on exit
    result = run_healthcheck(port)
    assert result.returncode == 1 and "unhealthy" in result.stderr
