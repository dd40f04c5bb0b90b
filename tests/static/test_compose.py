"""Static checks of compose/: the schema (check-jsonschema) and the rules a GPU fleet needs.

No Docker engine is needed: the files are validated against the Compose specification's schema
and read as YAML. Every rule lives in a checker function that returns the problems it finds, and
each checker is also fed a broken document, so that a rule which can no longer fail is noticed.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
BASE_FILE = COMPOSE_DIR / "docker-compose.yml"
CPU_FILE = COMPOSE_DIR / "docker-compose.cpu.yml"
#: scripts/compose-smoke's override: local stand-ins for the postgres and redis images.
LOCAL_FILE = ROOT / "scripts" / "docker" / "compose.local-images.yml"
#: The only services whose images the local override may replace.
STAND_IN_SERVICES = {"postgres", "redis"}

#: Services that run until stopped and must report their health.
LONG_RUNNING = ("postgres", "redis", "api", "reaper", "worker", "flower")
#: gpufleet services whose health is `gpufleet probe <service>`.
PROBED = ("api", "worker", "reaper")
#: Services that touch the database and so must wait for the migrations.
NEEDS_MIGRATIONS = ("api", "reaper", "worker")
#: Variables that hold secrets: never a default, compose must stop when they are unset.
SECRETS = ("POSTGRES_PASSWORD", "GPUFLEET_API_TOKENS", "FLOWER_BASIC_AUTH")
#: A running job needs this long to checkpoint before SIGKILL.
MIN_STOP_GRACE_S = 60.0

Doc = dict[str, Any]


# --- loading -------------------------------------------------------------------------------


class Reset:
    """A value tagged `!reset`: the merge removes the key from the files before."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Override:
    """A value tagged `!override`: the merge replaces the value instead of merging it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's own tags."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset(_plain(loader, node)))
ComposeLoader.add_constructor("!override", lambda loader, node: Override(_plain(loader, node)))


def load(path: Path) -> Doc:
    doc = yaml.load(path.read_text(), Loader=ComposeLoader)  # ComposeLoader is a SafeLoader
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def untagged(value: Any) -> Any:
    """The document as a plain JSON-able tree: `!reset`/`!override` replaced by their value."""
    if isinstance(value, Reset | Override):
        return untagged(value.value)
    if isinstance(value, dict):
        return {key: untagged(item) for key, item in value.items()}
    if isinstance(value, list):
        return [untagged(item) for item in value]
    return value


def merge(base: Any, override: Any, path: str = "") -> Any:
    """Merge two compose documents the way `docker compose -f base -f override` does.

    The subset of the Compose merge rules that these files use: mappings merge key by key,
    sequences are appended, scalars are replaced; `command`, `entrypoint` and `healthcheck.test`
    are replaced; `!reset` removes the key and `!override` replaces the value outright.
    """
    if isinstance(override, Override):
        return untagged(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value, where)
            else:
                merged[key] = untagged(value)
        return merged
    replaced = path.endswith((".command", ".entrypoint", ".healthcheck.test"))
    if isinstance(base, list) and isinstance(override, list) and not replaced:
        return base + untagged(override)
    if override is None:
        return base
    return untagged(override)


# --- tools -----------------------------------------------------------------------------------


def venv_tool(name: str) -> Path:
    """An executable of this interpreter's environment; a missing tool fails, never skips."""
    tool = Path(sys.executable).parent / name
    assert tool.exists(), f"{tool} is missing: install the dev extra (pip install -e '.[dev]')"
    return tool


def schema_errors(path: Path) -> str:
    """check-jsonschema's complaints about `path` against the Compose spec; '' when valid."""
    result = subprocess.run(
        [str(venv_tool("check-jsonschema")), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return "" if result.returncode == 0 else result.stdout + result.stderr


# --- rules -----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(value: str | int | float) -> float:
    """Seconds in a compose duration (`2m`, `1m30s`, `90s`; a bare number is seconds)."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def gpu_requests(service: Doc) -> list[Doc]:
    """The NVIDIA GPU device requests of a service (`deploy.resources.reservations.devices`)."""
    reservations = (service.get("deploy") or {}).get("resources", {}).get("reservations") or {}
    return [
        device
        for device in reservations.get("devices") or []
        if device.get("driver") == "nvidia" or "gpu" in (device.get("capabilities") or [])
    ]


def command_text(value: str | list[str] | None) -> str:
    return " ".join(value) if isinstance(value, list) else (value or "")


def _pinned(image: str) -> bool:
    """Whether an image reference names a digest or a tag other than `latest`."""
    if "@sha256:" in image:
        return True
    name = image.rpartition("/")[2]
    return ":" in name and name.rpartition(":")[2] not in ("", "latest")


def _required_var(value: Any, name: str | None = None) -> bool:
    """Whether `value` is exactly `${VAR:?message}` (of `name`, when given)."""
    var = re.escape(name) if name else r"[A-Z_][A-Z0-9_]*"
    return isinstance(value, str) and re.fullmatch(r"\$\{" + var + r":\?[^}]*\}", value) is not None


def _healthcheck_problems(name: str, service: Doc) -> list[str]:
    check = service.get("healthcheck")
    if not check or check.get("disable") or not check.get("test"):
        return [f"{name}: no healthcheck"]
    if check["test"] in ("NONE", ["NONE"]):
        return [f"{name}: healthcheck is NONE"]
    if name in PROBED and f"gpufleet probe {name}" not in command_text(check["test"]):
        return [f"{name}: healthcheck is not `gpufleet probe {name}`"]
    return []


def _depends_problems(name: str, service: Doc, wanted: dict[str, str]) -> list[str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return [f"{name}: depends_on has no conditions (a list)"]
    return [
        f"{name}: must depend on {dep} with condition {condition}"
        for dep, condition in wanted.items()
        if (depends.get(dep) or {}).get("condition") != condition
    ]


def worker_problems(worker: Doc) -> list[str]:
    problems = []
    if "container_name" in worker:
        problems.append("worker: container_name prevents --scale worker=N")
    if worker.get("ports"):
        problems.append("worker: published ports collide between replicas")
    requests = gpu_requests(worker)
    if not any(
        r.get("driver") == "nvidia"
        and "gpu" in (r.get("capabilities") or [])
        and str(r.get("count")) == "all"
        for r in requests
    ):
        problems.append("worker: no GPU reservation (driver nvidia, count all, capabilities gpu)")
    grace = worker.get("stop_grace_period")
    if grace is None or duration_s(grace) < MIN_STOP_GRACE_S:
        problems.append(f"worker: stop_grace_period {grace!r} is under {MIN_STOP_GRACE_S:g}s")
    environment = worker.get("environment")
    if not isinstance(environment, dict):
        return [*problems, "worker: environment must be a mapping"]
    mounts = {
        m.get("target"): m.get("source")
        for m in worker.get("volumes") or []
        if isinstance(m, dict) and m.get("type") == "volume"
    }
    for variable in ("GPUFLEET_CHECKPOINT_ROOT", "GPUFLEET_DATA_ROOT"):
        if environment.get(variable) not in mounts:
            problems.append(f"worker: no named volume mounted at {variable}")
    return problems


def compose_problems(doc: Doc) -> list[str]:
    """Everything wrong with the base compose file, as messages; [] when it is right."""
    services: dict[str, Doc] = doc.get("services") or {}
    problems: list[str] = []
    for name in (*LONG_RUNNING, "migrate"):
        if name not in services:
            problems.append(f"service {name} is missing")
    if problems:
        return problems

    for name in LONG_RUNNING:
        service = services[name]
        problems += _healthcheck_problems(name, service)
        if service.get("restart") != "unless-stopped":
            problems.append(f"{name}: restart must be unless-stopped")
    built_here = {service.get("image") for service in services.values() if "build" in service}
    for name, service in services.items():
        image = service.get("image")
        if image and image not in built_here and not _pinned(image):
            problems.append(f"{name}: image {image!r} is not pinned to a version")

    migrate = services["migrate"]
    if "gpufleet db upgrade" not in command_text(migrate.get("command")):
        problems.append("migrate: must run `gpufleet db upgrade`")
    if migrate.get("restart", "no") != "no":
        problems.append("migrate: a one-shot must not restart")
    healthy = {"postgres": "service_healthy", "redis": "service_healthy"}
    for name in NEEDS_MIGRATIONS:
        wanted = {"migrate": "service_completed_successfully", **healthy}
        problems += _depends_problems(name, services[name], wanted)

    problems += worker_problems(services["worker"])
    for name, service in services.items():
        if name != "worker" and gpu_requests(service):
            problems.append(f"{name}: reserves a GPU, only the worker may")

    flower = services["flower"]
    environment = flower.get("environment") or {}
    from_env = _required_var(environment.get("FLOWER_BASIC_AUTH"), "FLOWER_BASIC_AUTH")
    argument = re.search(
        r"--basic-auth[= ][\"']?(\$\{[^}]*\})", command_text(flower.get("command"))
    )
    if not from_env and not (argument and _required_var(argument.group(1))):
        problems.append("flower: basic auth must come from a ${VAR:?...} variable")

    problems += _environment_problems(services)
    problems += _volume_problems(doc, services)
    return problems


def _environment_problems(services: dict[str, Doc]) -> list[str]:
    problems = []
    api_env = services["api"].get("environment") or {}
    if not _required_var(api_env.get("GPUFLEET_API_TOKENS"), "GPUFLEET_API_TOKENS"):
        problems.append("api: GPUFLEET_API_TOKENS must be ${GPUFLEET_API_TOKENS:?...}")
    pg_env = services["postgres"].get("environment") or {}
    if not _required_var(pg_env.get("POSTGRES_PASSWORD"), "POSTGRES_PASSWORD"):
        problems.append("postgres: POSTGRES_PASSWORD must be ${POSTGRES_PASSWORD:?...}")
    for name in ("migrate", *NEEDS_MIGRATIONS):
        environment = services[name].get("environment") or {}
        for variable in ("GPUFLEET_DATABASE_URL", "GPUFLEET_BROKER_URL"):
            if not environment.get(variable):
                problems.append(f"{name}: {variable} is not set")
        if "@postgres:5432/" not in str(environment.get("GPUFLEET_DATABASE_URL", "")):
            problems.append(f"{name}: GPUFLEET_DATABASE_URL does not point at the postgres service")
    return problems


def _volume_problems(doc: Doc, services: dict[str, Doc]) -> list[str]:
    declared = set(doc.get("volumes") or {})
    problems = []
    for name, service in services.items():
        for mount in service.get("volumes") or []:
            if isinstance(mount, dict):
                source, named = mount.get("source"), mount.get("type") == "volume"
            else:  # short syntax: `name:/path` is a named volume, `./dir:/path` a bind mount
                source = mount.split(":")[0]
                named = ":" in mount and not source.startswith(("/", ".", "~", "$"))
            if named and source not in declared:
                problems.append(f"{name}: volume {source!r} is not declared under volumes:")
    for volume in ("pgdata", "checkpoints", "data"):
        if volume not in declared:
            problems.append(f"named volume {volume!r} is missing")
    return problems


def secret_problems(text: str, *, required: tuple[str, ...] = SECRETS) -> list[str]:
    """Secrets in the raw text: only ever `${VAR:?message}`, never a default or a literal."""
    problems = []
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        if name in required and not uses:
            problems.append(f"{name} is never used")
        problems += [
            f"${{{name}{rest}}} must be ${{{name}:?...}}"
            for rest in uses
            if not rest.startswith(":?")
        ]
        for value in re.findall(r"^\s*-?\s*" + name + r"\s*[:=]\s*(.*)$", text, re.MULTILINE):
            if not value.strip().strip("'\"").startswith("${" + name + ":?"):
                problems.append(f"{name} is set to {value.strip()!r}, not ${{{name}:?...}}")
    return problems


def cpu_override_problems(override: Doc, merged: Doc) -> list[str]:
    """The CPU override: simulated GPUs on the worker, no GPU request left after the merge."""
    problems = []
    worker = (override.get("services") or {}).get("worker") or {}
    environment = worker.get("environment")
    if not isinstance(environment, dict) or not environment.get("GPUFLEET_FAKE_GPUS"):
        problems.append("cpu override: worker must set GPUFLEET_FAKE_GPUS (as a mapping)")
    for name, service in (merged.get("services") or {}).items():
        if gpu_requests(service):
            problems.append(f"cpu override: {name} still reserves a GPU after the merge")
    merged_env = merged["services"]["worker"].get("environment") or {}
    if not merged_env.get("GPUFLEET_DATABASE_URL"):
        problems.append("cpu override: the merge lost the worker's base environment")
    return problems


def local_images_problems(override: Doc) -> list[str]:
    """The local-images override: postgres and redis built from files that exist, nothing else.

    Relative paths resolve against the first file's folder (compose/), as Compose does.
    """
    problems = []
    services: dict[str, Doc] = override.get("services") or {}
    for name in sorted(set(services) - STAND_IN_SERVICES):
        problems.append(f"local images: must not change {name}")
    for name in sorted(STAND_IN_SERVICES):
        service = services.get(name) or {}
        build = service.get("build") or {}
        if set(service) != {"image", "build"}:
            problems.append(f"local images: {name} may set only image and build")
        if not str(service.get("image", "")).startswith("gpufleet-local/"):
            problems.append(f"local images: {name}'s image must be named gpufleet-local/...")
        dockerfile = COMPOSE_DIR / str(build.get("context", "")) / str(build.get("dockerfile", ""))
        if not build.get("context") or not dockerfile.is_file():
            problems.append(f"local images: {name} builds from a missing {dockerfile}")
    return problems


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> Doc:
    return load(BASE_FILE)


@pytest.fixture(scope="module")
def cpu() -> Doc:
    return load(CPU_FILE)


@pytest.fixture(scope="module")
def merged(base: Doc, cpu: Doc) -> Doc:
    result = merge(base, cpu)
    assert isinstance(result, dict)
    return result


def mutated(doc: Doc, **changes: Any) -> Doc:
    """A deep copy of `doc` with `changes` applied.

    A key is a path with `__` between its parts (`services__worker__ports`); None deletes.
    """
    result = copy.deepcopy(doc)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = result
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return result


# --- schema ----------------------------------------------------------------------------------


def test_base_file_matches_the_compose_schema() -> None:
    assert schema_errors(BASE_FILE) == ""


def test_cpu_override_and_merge_match_the_compose_schema(
    tmp_path: Path, cpu: Doc, merged: Doc
) -> None:
    # check-jsonschema's YAML reader does not know Compose's `!reset` tag, so the override is
    # checked with the tag resolved to its (schema-valid) value, and the merged fleet as well.
    for name, doc in (("cpu.json", untagged(cpu)), ("merged.json", merged)):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        assert schema_errors(path) == "", name


def test_schema_check_rejects_an_invalid_file(tmp_path: Path, base: Doc) -> None:
    broken = mutated(base, services__worker__stop_grace_period=["2m"])
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert "stop_grace_period" in schema_errors(path)


# --- the base file ---------------------------------------------------------------------------


def test_base_file_follows_the_fleet_rules(base: Doc) -> None:
    assert compose_problems(base) == []


def test_base_file_writes_secrets_as_required_variables() -> None:
    assert secret_problems(BASE_FILE.read_text()) == []


def test_cpu_override_holds_no_secret_with_a_default() -> None:
    assert secret_problems(CPU_FILE.read_text(), required=()) == []


ONE_GPU = {
    "resources": {"reservations": {"devices": [{"driver": "nvidia", "capabilities": ["gpu"]}]}}
}


@pytest.mark.parametrize(
    ("changes", "flagged"),
    [
        ({"services__worker__container_name": "gpufleet-worker"}, "container_name"),
        ({"services__worker__ports": ["9000:9000"]}, "published ports"),
        ({"services__worker__stop_grace_period": "10s"}, "stop_grace_period"),
        ({"services__worker__stop_grace_period": None}, "stop_grace_period"),
        ({"services__worker__deploy": None}, "no GPU reservation"),
        ({"services__worker__volumes": []}, "GPUFLEET_CHECKPOINT_ROOT"),
        ({"services__api__deploy": ONE_GPU}, "api: reserves"),
        ({"services__api__healthcheck": None}, "api: no healthcheck"),
        ({"services__redis__healthcheck": {"disable": True}}, "redis: no healthcheck"),
        ({"services__reaper__healthcheck__test": ["CMD", "true"]}, "gpufleet probe reaper"),
        ({"services__worker__restart": "always"}, "worker: restart"),
        ({"services__migrate__command": ["gpufleet", "api"]}, "gpufleet db upgrade"),
        ({"services__worker__depends_on__migrate__condition": "service_started"}, "migrate"),
        ({"services__api__depends_on__postgres": None}, "api: must depend on postgres"),
        ({"services__flower__environment__FLOWER_BASIC_AUTH": "admin:admin"}, "basic auth"),
        ({"services__flower__environment__FLOWER_BASIC_AUTH": None}, "basic auth"),
        (
            {"services__api__environment__GPUFLEET_API_TOKENS": "${GPUFLEET_API_TOKENS:-}"},
            "GPUFLEET_API_TOKENS",
        ),
        ({"services__redis__image": "redis:latest"}, "not pinned"),
        ({"volumes__checkpoints": None}, "volume 'checkpoints' is not declared"),
        ({"services__postgres__volumes": ["pg:/var/lib/postgresql/data"]}, "volume 'pg'"),
    ],
)
def test_compose_checker_flags_a_broken_file(
    base: Doc, changes: dict[str, Any], flagged: str
) -> None:
    problems = compose_problems(mutated(base, **changes))
    assert any(flagged in problem for problem in problems), problems


def test_compose_checker_accepts_flower_auth_as_an_argument(base: Doc) -> None:
    command = ["celery", "flower", "--basic-auth=${FLOWER_BASIC_AUTH:?Variable not set}"]
    doc = mutated(base, services__flower__environment={}, services__flower__command=command)
    assert compose_problems(doc) == []


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        ("x: ${POSTGRES_PASSWORD:-postgres}", "must be ${POSTGRES_PASSWORD:?...}"),
        ("x: ${POSTGRES_PASSWORD}", "must be ${POSTGRES_PASSWORD:?...}"),
        ("      POSTGRES_PASSWORD: changethis", "set to 'changethis'"),
        ("      - FLOWER_BASIC_AUTH=admin:admin", "set to 'admin:admin'"),
    ],
)
def test_secret_checker_flags_defaults_and_literals(text: str, flagged: str) -> None:
    problems = secret_problems(BASE_FILE.read_text() + "\n" + text + "\n")
    assert any(flagged in problem for problem in problems), problems


def test_secret_checker_flags_a_missing_secret() -> None:
    text = BASE_FILE.read_text().replace("FLOWER_BASIC_AUTH", "FLOWER_AUTH")
    assert "FLOWER_BASIC_AUTH is never used" in secret_problems(text)


def test_durations_are_read_like_compose() -> None:
    assert duration_s("2m") == 120
    assert duration_s("1m30s") == 90
    assert duration_s("1h") == 3600
    assert duration_s(45) == 45
    with pytest.raises(ValueError):
        duration_s("two minutes")


# --- the CPU override ------------------------------------------------------------------------


def test_cpu_override_simulates_gpus_and_drops_the_gpu_request(cpu: Doc, merged: Doc) -> None:
    assert cpu_override_problems(cpu, merged) == []
    worker = merged["services"]["worker"]
    assert gpu_requests(worker) == []
    # Everything else of the base worker survives the merge.
    assert worker_problems(worker) == [
        "worker: no GPU reservation (driver nvidia, count all, capabilities gpu)"
    ]


def test_cpu_override_without_reset_is_flagged(base: Doc, cpu: Doc) -> None:
    # Merging appends to lists: without `!reset` the base file's GPU request would stay.
    plain = mutated(cpu, services__worker__deploy__resources__reservations__devices=[])
    problems = cpu_override_problems(plain, merge(base, plain))
    assert "cpu override: worker still reserves a GPU after the merge" in problems


def test_cpu_override_without_fake_gpus_is_flagged(base: Doc, cpu: Doc) -> None:
    plain = mutated(cpu, services__worker__environment__GPUFLEET_FAKE_GPUS=None)
    problems = cpu_override_problems(plain, merge(base, plain))
    assert any("GPUFLEET_FAKE_GPUS" in problem for problem in problems), problems


def test_merge_follows_compose_rules() -> None:
    base = {"s": {"env": {"A": "1"}, "dns": ["1.1.1.1"], "command": ["a"], "x": {"y": 1}}}
    override = {
        "s": {"env": {"B": "2"}, "dns": ["8.8.8.8"], "command": ["b"], "x": Reset({})},
    }
    assert merge(base, override) == {
        "s": {"env": {"A": "1", "B": "2"}, "dns": ["1.1.1.1", "8.8.8.8"], "command": ["b"]}
    }
    assert merge({"s": {"x": {"y": 1}}}, {"s": {"x": Override({"z": 2})}}) == {"s": {"x": {"z": 2}}}


def test_local_images_override_swaps_only_postgres_and_redis(merged: Doc) -> None:
    override = load(LOCAL_FILE)
    assert schema_errors(LOCAL_FILE) == ""
    assert local_images_problems(override) == []
    # The fleet with the stand-ins still follows every rule but the GPU request (CPU override).
    assert compose_problems(merge(merged, override)) == [
        "worker: no GPU reservation (driver nvidia, count all, capabilities gpu)"
    ]


@pytest.mark.parametrize(
    ("changes", "flagged"),
    [
        ({"services__api": {"image": "gpufleet-local/api"}}, "must not change api"),
        ({"services__redis__build__dockerfile": "nowhere.Dockerfile"}, "missing"),
        ({"services__postgres__image": "postgres:16.9-bookworm"}, "gpufleet-local/"),
        ({"services__postgres__environment": {"POSTGRES_PASSWORD": "x"}}, "only image and build"),
    ],
)
def test_local_images_checker_flags_a_broken_override(
    changes: dict[str, Any], flagged: str
) -> None:
    problems = local_images_problems(mutated(load(LOCAL_FILE), **changes))
    assert any(flagged in problem for problem in problems), problems


def test_build_contexts_and_dockerfiles_exist(base: Doc) -> None:
    builds = [s["build"] for s in base["services"].values() if "build" in s]
    assert len(builds) == 2
    for build in builds:
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).is_file(), build
