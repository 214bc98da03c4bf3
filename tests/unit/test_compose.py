"""docker-compose.yml checked against the Procfile, the settings and the LiveKit config (parsed
here; `make compose-check` brings it up for real, with Docker)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from config.settings import Settings, build_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict = COMPOSE["services"]
SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields}

# Compose-only variables (README "Docker"): base images, and host ports for a machine where the
# defaults are taken. Never a process's environment.
COMPOSE_ONLY_VARIABLES = {"PYTHON_IMAGE", "NODE_IMAGE", "REDIS_IMAGE", "POSTGRES_IMAGE", "LIVEKIT_IMAGE",
                          "WEB_HOST_PORT", "FLOWER_HOST_PORT", "POSTGRES_HOST_PORT", "REDIS_HOST_PORT"}

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def _procfile() -> dict[str, str]:
    processes = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = command.strip()
    return processes


PROCFILE = _procfile()
PROCFILE_VARIABLES = {m.group(1) or m.group(3) for cmd in PROCFILE.values() for m in _VARIABLE.finditer(cmd)}


def _resolve(value) -> str:
    """Compose's interpolation with nothing in the environment: ${VAR:-default} -> default."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: _resolve(value) for key, value in env.items()}


def _expand_procfile(command: str, env: dict[str, str]) -> list[str]:
    """The Procfile command as its shell would run it in that service ($PORT, ${X:-default})."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in env:
            return env[name]
        assert m.group(2) is not None, f"${name} has no value in the service and no default"
        return m.group(2)

    return shlex.split(_VARIABLE.sub(sub, command))


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _healthcheck(service: dict) -> str:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def _published(service: dict) -> dict[str, str]:
    """container port (with /udp) -> the host side, from short-syntax port strings."""
    out = {}
    for port in service.get("ports", []):
        port = _resolve(port)
        proto = ""
        if "/" in port:
            port, proto = port.split("/")
            proto = "/" + proto
        parts = port.split(":")
        out[parts[-1] + proto] = ":".join(parts[:-1])
    return out


def _built() -> tuple[str, dict]:
    """(image name, build section) of the one service that builds callflow's image."""
    builders = [svc for svc in SERVICES.values() if "build" in svc]
    assert len(builders) == 1, "one service builds the image (compose would build it once per service)"
    return builders[0]["image"], builders[0]["build"]


def _app_services() -> dict[str, dict]:
    image, _ = _built()
    return {name: svc for name, svc in SERVICES.items() if svc.get("image") == image}


# ---- the processes -------------------------------------------------------------------------------


def test_the_procfile_has_the_contract_processes():
    assert set(PROCFILE) == {"web", "listener", "worker", "beat", "flower"}


@pytest.mark.parametrize("process", sorted(PROCFILE))
def test_each_procfile_process_has_a_service_running_the_same_command(process):
    assert process in SERVICES, f"no compose service for the Procfile's {process}"
    service = SERVICES[process]
    assert process in _app_services(), "runs the image built from the project's Dockerfile"
    assert _command(service) == _expand_procfile(PROCFILE[process], _environment(service))


def test_the_image_is_python_311_slim_with_the_project_installed():
    dockerfile = (ROOT / "Dockerfile").read_text()
    # Base images are build arguments (a mirror, an air-gapped copy), defaulting to the public ones.
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^ARG NODE_IMAGE=node:\S+$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{NODE_IMAGE\} AS demo$", dockerfile, re.M)
    _, build = _built()
    assert build["context"] == "."
    assert {k: _resolve(v) for k, v in build["args"].items()} == {
        "PYTHON_IMAGE": "python:3.11-slim",
        "NODE_IMAGE": re.search(r"^ARG NODE_IMAGE=(\S+)$", dockerfile, re.M).group(1)}
    assert re.search(r"^USER callflow$", dockerfile, re.M), "runs as a non-root user"
    assert re.search(r"^RUN pip install \.(\s|$)", dockerfile, re.M)
    for needed in ("pyproject.toml", "config", "orchestration", "workers", "supabase"):
        assert re.search(rf"^COPY .*\b{needed}\b", dockerfile, re.M), needed
    # `callflow migrate` must find the migrations: the checkout is on the path before site-packages.
    assert "PYTHONPATH=/app" in dockerfile and "WORKDIR /app" in dockerfile


def test_migrations_run_once_before_the_processes():
    migrate = SERVICES["migrate"]
    assert _command(migrate) == ["callflow", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "listener", "worker", "beat"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name


def test_dependencies_have_conditions_and_healthy_means_a_health_check():
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in SERVICES.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, spec in deps.items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert spec["condition"] in valid, (name, dep)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy, which has no health check"
    for name in PROCFILE:
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert SERVICES["worker"]["depends_on"]["livekit"]["condition"] in ("service_healthy", "service_started")


def test_health_checks():
    assert "redis-cli ping" in _healthcheck(SERVICES["redis"])
    assert "pg_isready" in _healthcheck(SERVICES["postgres"])
    web_port = _environment(SERVICES["web"])["PORT"]
    assert f"127.0.0.1:{web_port}/healthz" in _healthcheck(SERVICES["web"])
    worker = _healthcheck(SERVICES["worker"])
    assert "celery -A workers.app inspect ping" in worker and "-d celery@$$HOSTNAME" in worker
    flower_port = _environment(SERVICES["flower"])["FLOWER_PORT"]
    assert f"127.0.0.1:{flower_port}/healthcheck" in _healthcheck(SERVICES["flower"])
    assert "7880" in _healthcheck(SERVICES["livekit"])


def test_ports():
    web_env = _environment(SERVICES["web"])
    assert web_env["PORT"] in _published(SERVICES["web"])
    assert web_env["WEB_HOST"] == "0.0.0.0"  # reachable from the other containers
    flower_env = _environment(SERVICES["flower"])
    assert _published(SERVICES["flower"]) == {flower_env["FLOWER_PORT"]: "127.0.0.1:" + flower_env["FLOWER_PORT"]}
    livekit = _published(SERVICES["livekit"])
    assert {"7880", "7881", "7882/udp"} <= set(livekit)
    # Postgres and Redis on the contract's local ports, loopback only, so the host's `callflow` works.
    assert _published(SERVICES["postgres"]) == {"5432": "127.0.0.1:54322"}
    assert _published(SERVICES["redis"]) == {"6379": "127.0.0.1:6379"}
    hosts = [host for svc in SERVICES.values() for host in _published(svc).values()]
    assert len(hosts) == len(set(hosts)), "two services publish the same host port"


def test_redis_persists_and_postgres_keeps_its_data():
    redis = SERVICES["redis"]
    command = " ".join(_command(redis))
    assert "--appendonly yes" in command
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in SERVICES["postgres"]["volumes"])
    assert _resolve(SERVICES["postgres"]["image"]).startswith(("postgres:15", "supabase/postgres"))


# ---- the variables ------------------------------------------------------------------------------


def test_every_variable_is_a_settings_field():
    allowed = SETTINGS_VARIABLES | PROCFILE_VARIABLES
    for name, service in _app_services().items():
        for key in (service.get("environment") or {}):
            assert key in allowed, f"{name}: {key} is neither a settings field nor a Procfile variable"
    # Everything compose interpolates from .env is a settings variable too, or one of compose's own.
    lines = (ROOT / "docker-compose.yml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    for m in _INTERPOLATION.finditer(text):
        assert m.group(1) in SETTINGS_VARIABLES | COMPOSE_ONLY_VARIABLES, m.group(1)
    for name, service in SERVICES.items():
        for value in (service.get("environment") or {}).values():
            assert not {m.group(1) for m in _INTERPOLATION.finditer(str(value))} & COMPOSE_ONLY_VARIABLES, name


def test_the_contract_variables_are_wired_to_the_compose_services():
    env = _environment(SERVICES["worker"])
    for key in ("DATABASE_URL", "REDIS_URL", "LIVEKIT_URL", "LIVEKIT_PUBLIC_URL", "LIVEKIT_API_KEY",
                "LIVEKIT_API_SECRET", "CALLFLOW_ENV"):
        assert key in env, key
    assert urlsplit(env["DATABASE_URL"]).hostname == "postgres"
    assert urlsplit(env["DATABASE_URL"]).port == 5432
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    assert urlsplit(env["LIVEKIT_URL"]).hostname == "livekit"
    assert urlsplit(env["LIVEKIT_PUBLIC_URL"]).hostname == "localhost"  # what clients on the host dial
    postgres_env = SERVICES["postgres"]["environment"]
    assert urlsplit(env["DATABASE_URL"]).password == postgres_env["POSTGRES_PASSWORD"]


@pytest.mark.parametrize("name", sorted(_app_services()))
def test_each_service_environment_is_valid_settings(name, monkeypatch):
    for key in SETTINGS_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    env = _environment(SERVICES[name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = build_settings()
    assert settings.callflow_env == "development"
    assert settings.database_url == env["DATABASE_URL"]


def test_each_app_service_takes_the_optional_env_file():
    for name, service in _app_services().items():
        files = service.get("env_file") or []
        assert any(isinstance(f, dict) and f["path"] == ".env" and f["required"] is False for f in files), name


# ---- LiveKit ------------------------------------------------------------------------------------


def _livekit_config() -> dict:
    livekit = SERVICES["livekit"]
    # The version the local set-up builds (scripts/stack.sh), by default.
    version = re.search(r'^LIVEKIT_VERSION="(v[0-9.]+)"$', (ROOT / "scripts/stack.sh").read_text(), re.M).group(1)
    assert livekit["image"] == "${LIVEKIT_IMAGE:-livekit/livekit-server:%s}" % version
    command = _command(livekit)
    path_in_container = command[command.index("--config") + 1]
    for volume in livekit["volumes"]:
        source, target = str(volume).split(":")[:2]
        if target == path_in_container:
            return yaml.safe_load((ROOT / source).read_text())
    raise AssertionError("the LiveKit config file is not mounted")


def test_livekit_webhook_points_at_the_web_service():
    config = _livekit_config()
    web_port = _environment(SERVICES["web"])["PORT"]
    urls = config["webhook"]["urls"]
    assert len(urls) == 1
    url = urlsplit(urls[0])
    assert (url.scheme, url.hostname, str(url.port), url.path) == ("http", "web", web_port, "/livekit/webhook")
    assert web_port in _published(SERVICES["web"])


def test_livekit_keys_match_the_apps_and_no_external_ip_discovery():
    config = _livekit_config()
    env = _environment(SERVICES["web"])
    assert config["keys"] == {env["LIVEKIT_API_KEY"]: env["LIVEKIT_API_SECRET"]}
    assert config["webhook"]["api_key"] == env["LIVEKIT_API_KEY"]
    assert len(env["LIVEKIT_API_SECRET"]) >= 32
    assert config["rtc"]["use_external_ip"] is False
    assert config["port"] == 7880 and config["rtc"]["tcp_port"] == 7881 and config["rtc"]["udp_port"] == 7882
