"""docker/compose.yaml and docker/Dockerfile, checked without a Docker engine (none runs here).

The compose file is validated against the Compose Specification's JSON schema
(docker/compose-spec.schema.json: ``schema/compose-spec.json`` of github.com/compose-spec/compose-spec,
Apache-2.0, vendored unchanged) after the variable interpolation ``docker compose`` does. ``docker
compose config`` would be the stronger check: it runs when the docker CLI has its compose plugin.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
TEST_ONLY_DEBS = (
    "orthanc",
    "orthanc-dicomweb",
    "orthanc-python",
    "dcmtk",
    "dicom3tools",
    "redis-server",
    "dcm2niix",
    "chromium",
)
_VARIABLE = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\})")


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``$$`` for a literal ``$``."""
    if isinstance(value, str):
        return _VARIABLE.sub(
            lambda m: "$" if m.group(1) == "$" else env.get(m.group(2)) or (m.group(3) or ""), value
        )
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), {})


def test_compose_file_is_valid_against_the_compose_spec_schema(compose: dict) -> None:
    schema = json.loads((DOCKER / "compose-spec.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors] == []


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI: the compose-spec schema test covers the file")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(
            f"the docker CLI has no compose plugin ({(probe.stderr or probe.stdout).strip()}); "
            "the compose-spec schema test covers the file"
        )
    done = subprocess.run(
        [docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_compose_wires_orthanc_the_node_redis_and_ohif(compose: dict) -> None:
    services = compose["services"]
    assert sorted(services) == ["ohif", "orthanc", "redis", "segnode", "viewer"]
    # Orthanc runs this repository's plugin, with the DICOMweb and Python plugins.
    orthanc = services["orthanc"]
    mounts = {
        v.split(":")[1]: (DOCKER / v.split(":")[0]).resolve()
        for v in orthanc["volumes"]
        if v.startswith("..")
    }
    assert mounts == {"/etc/orthanc/segnode_plugin.py": REPO / "orthanc" / "segnode_plugin.py"}
    config = json.loads(compose["configs"]["orthanc_json"]["content"])
    assert config["PythonScript"] == "/etc/orthanc/segnode_plugin.py"
    assert config["RegisteredUsers"] == {"segnode": "${ORTHANC_PASSWORD}"}  # Orthanc expands it
    assert config["Segnode"]["NodeUrl"] == "http://segnode:8080"
    assert config["DicomWeb"]["Enable"] is True
    # The node: built from docker/Dockerfile, Redis queue, fetches from and delivers to Orthanc.
    node = services["segnode"]
    assert (REPO / node["build"]["context"].replace("..", ".") / node["build"]["dockerfile"]).is_file()
    env = node["environment"]
    assert (
        env["SEGNODE_QUEUE__BACKEND"] == "redis" and env["SEGNODE_QUEUE__REDIS_URL"] == "redis://redis:6379/0"
    )
    assert env["SEGNODE_ORTHANC__URL"] == "http://orthanc:8042"
    assert json.loads(env["SEGNODE_HTTP__TOKENS"]) == {"orthanc": "change-me-token"}
    assert json.loads(env["SEGNODE_DESTINATIONS"]) == [
        {
            "name": "orthanc",
            "kind": "stowrs",
            "url": "http://orthanc:8042/dicom-web",
            "username": "segnode",
            "password": "change-me",
        }
    ]
    # What the environment gives must be valid node settings.
    from node.config import Settings

    settings = Settings(**{section: value for section, value in _settings_from_env(env).items()})
    assert settings.destinations[0].url == "http://orthanc:8042/dicom-web"
    assert settings.orthanc.password.get_secret_value() == "change-me"
    # OHIF reads Orthanc's DICOMweb through the viewer proxy (same origin), which adds the credentials.
    assert services["ohif"]["image"].startswith("ohif/app:")
    assert "qidoRoot: '/dicom-web'" in compose["configs"]["ohif_app_config"]["content"]
    nginx = compose["configs"]["viewer_nginx"]["content"]
    assert "proxy_pass http://orthanc:8042/dicom-web/;" in nginx and "${ORTHANC_BASIC_AUTH}" in nginx
    import base64

    assert base64.b64decode(services["viewer"]["environment"]["ORTHANC_BASIC_AUTH"]) == b"segnode:change-me"
    # Every published port is on loopback.
    for service in services.values():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))


def _settings_from_env(env: dict[str, str]) -> dict:
    """SEGNODE_<SECTION>__<KEY> (and SEGNODE_DESTINATIONS) as pydantic-settings reads them."""
    out: dict = {}
    for name, value in env.items():
        if not name.startswith("SEGNODE_"):
            continue
        key = name.removeprefix("SEGNODE_").lower()
        if "__" in key:
            section, field = key.split("__", 1)
            parsed = json.loads(value) if value.startswith(("{", "[")) else value
            out.setdefault(section, {})[field] = parsed
        else:
            out[key] = json.loads(value)
    return out


def test_dockerfile_is_bookworm_python311_without_test_only_packages_and_runs_serve() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [
        line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")
    ]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms == ["debian:bookworm-slim"]
    apt = " ".join(line for line in instructions if "apt-get install" in line)
    assert "python3.11" in apt and "python3.11-venv" in apt
    assert not [deb for deb in TEST_ONLY_DEBS if re.search(rf"(^|\s){re.escape(deb)}(\s|$)", apt)]
    pip = [line for line in instructions if "pip install" in line]
    assert pip and all(
        "torch==2.13.0" in line for line in pip if ".[seg]" in line
    )  # same call, see DESIGN.md
    assert '".[seg]"' in " ".join(pip) and "[test" not in " ".join(pip)
    assert 'ENTRYPOINT ["segnode"]' in instructions and 'CMD ["serve"]' in instructions
    assert any(line.startswith("USER segnode") for line in instructions)
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 : ignore.index("*") + 5] == [
        "!pyproject.toml",
        "!README.md",
        "!node/",
        "!configs/",
    ]
