"""Static checks of the Dockerfiles: hadolint, and the rules of the two images.

No Docker engine is needed. The API image must stay free of torch and tensorflow (DESIGN.md,
principle 5); both images are multi-stage, run as a non-root user and report their health, and
build where no image registry is reachable (the base image is a build argument, no `# syntax=`
frontend to pull, a torch wheel in wheels/ is never downloaded again). Each checker is also fed
a broken Dockerfile, so that a rule which can no longer fail is noticed.
(scripts/compose-smoke builds and runs them on a real engine.)
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "Dockerfile.api"
WORKER = ROOT / "Dockerfile.worker"
DOCKERIGNORE = ROOT / ".dockerignore"
#: The local stand-ins for the official postgres and redis images (scripts/compose-smoke).
STAND_INS = sorted((ROOT / "scripts" / "docker").glob("*.Dockerfile"))

API_CMD = ["gpufleet", "api", "--host", "0.0.0.0", "--port", "8000"]
WORKER_CMD = ["gpufleet", "worker"]
WORKER_EXTRAS = {"worker", "tensorflow", "flower"}
#: Packages that must never be installed into the API image.
GPU_PACKAGES = re.compile(r"torch|tensorflow|keras|jax|nvidia|pynvml|cupy", re.IGNORECASE)

Instruction = tuple[str, str]  # (KEYWORD, arguments)


# --- reading a Dockerfile --------------------------------------------------------------------


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile: continuations joined, comment lines dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            result.append((keyword.upper(), args.strip()))
    if pending.strip():
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def final_stage(found: list[Instruction]) -> list[Instruction]:
    starts = [i for i, (keyword, _) in enumerate(found) if keyword == "FROM"]
    return found[starts[-1] :] if starts else []


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, split at `&&`, `||`, `;` and `|`."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def arg_defaults(found: list[Instruction]) -> dict[str, str]:
    """The default of every `ARG NAME=default` in the file (global or in a stage)."""
    defaults: dict[str, str] = {}
    for keyword, rest in found:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            defaults[name.strip()] = default.strip().strip("\"'")
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced by their value where one is known."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def pip_installs(found: list[Instruction]) -> list[list[str]]:
    """The words after `install` of every `pip install` in a RUN, options included."""
    installs: list[list[str]] = []
    for keyword, args in found:
        if keyword != "RUN":
            continue
        for words in shell_commands(args):
            head = [Path(word).name for word in words[:3]]
            if "install" not in words or not any(w.startswith("pip") for w in head):
                continue
            installs.append(words[words.index("install") + 1 :])
    return installs


def pip_install_args(found: list[Instruction]) -> list[str]:
    """Every requirement that a `pip install` in a RUN names (options dropped, ARGs filled in)."""
    defaults = arg_defaults(found)
    return [
        substitute(word, defaults)
        for words in pip_installs(found)
        for word in words
        if not word.startswith("-") and not _option_value(words, word)
    ]


#: pip options that take a value (the value is not a requirement).
_VALUED_OPTIONS = (
    "-c",
    "--constraint",
    "-f",
    "--find-links",
    "-r",
    "--requirement",
    "-i",
    "--index-url",
    "--extra-index-url",
)


def _option_value(words: list[str], word: str) -> bool:
    position = words.index(word)
    return position > 0 and words[position - 1] in _VALUED_OPTIONS


def base_images(found: list[Instruction]) -> list[str]:
    """The images the stages start from, global ARG defaults substituted; stages excluded."""
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    images: list[str] = []
    seen_from = False
    for keyword, rest in found:
        if keyword == "ARG" and not seen_from and "=" in rest:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
        if keyword != "FROM":
            continue
        seen_from = True
        words = [word for word in rest.split() if not word.startswith("--")]
        image = substitute(words[0], global_args)
        if image.lower() not in stages:
            images.append(image)
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
    return images


# --- rules -----------------------------------------------------------------------------------


def dockerfile_problems(text: str) -> list[str]:
    """What every gpufleet image needs, as messages; [] when the Dockerfile is right."""
    found = instructions(text)
    problems = []
    if sum(keyword == "FROM" for keyword, _ in found) < 2:
        problems.append("not multi-stage (fewer than two FROM)")
    problems += offline_problems(text)
    for image in base_images(found):
        name = image.rpartition("/")[2]
        pinned = "@sha256:" in image or (":" in name and not name.endswith(":latest"))
        if not pinned or "$" in image:
            problems.append(f"base image {image!r} is not pinned to a version")
    last = final_stage(found)
    users = [args for keyword, args in last if keyword == "USER"]
    if not users:
        problems.append("the final stage sets no USER (it would run as root)")
    elif users[-1].partition(":")[0].strip() in ("root", "0"):
        problems.append(f"the final stage runs as root (USER {users[-1]})")
    checks = [args for keyword, args in last if keyword == "HEALTHCHECK"]
    if not checks or checks[-1].upper().startswith("NONE"):
        problems.append("the final stage has no HEALTHCHECK")
    problems += _ignore_problems(text)
    return problems


def offline_problems(text: str) -> list[str]:
    """What keeps a build off a registry: a `# syntax=` frontend, a base image fixed in FROM."""
    problems = []
    if re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE):
        problems.append("a `# syntax=` line makes BuildKit pull a frontend image")
    found = instructions(text)
    stages: set[str] = set()
    for keyword, rest in found:
        if keyword != "FROM":
            continue
        words = [word for word in rest.split() if not word.startswith("--")]
        if words[0].lower() not in stages and words[0] != "${BASE_IMAGE}":
            problems.append(f"FROM {words[0]}: the base image must be ${{BASE_IMAGE}}")
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
    if "BASE_IMAGE" not in arg_defaults(found[: _first_from(found)]):
        problems.append("no global `ARG BASE_IMAGE=<pinned image>` before the first FROM")
    return problems


def _first_from(found: list[Instruction]) -> int:
    return next((i for i, (keyword, _) in enumerate(found) if keyword == "FROM"), len(found))


def _ignore_problems(text: str) -> list[str]:
    """Every `# hadolint ignore=` pragma comes with a comment that names the rule and why."""
    problems = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not match:
            continue
        above = []
        for earlier in reversed(lines[:number]):
            if not earlier.strip().startswith("#"):
                break
            above.append(earlier)
        for rule in match.group(1).split(","):
            if not any(rule in comment for comment in above):
                problems.append(f"line {number + 1}: ignoring {rule} without a reason above it")
    return problems


def api_image_problems(text: str) -> list[str]:
    """The API image: no extras, nothing GPU-related installed, the agreed command."""
    found = instructions(text)
    problems = []
    for requirement in pip_install_args(found):
        if "[" in requirement:
            problems.append(f"the API image installs extras: {requirement}")
        if GPU_PACKAGES.search(requirement):
            problems.append(f"the API image installs {requirement}")
    cmd = [exec_form(args) for keyword, args in final_stage(found) if keyword == "CMD"]
    if not cmd or cmd[-1] != API_CMD:
        problems.append(f"CMD must be {json.dumps(API_CMD)}")
    return problems


def worker_image_problems(text: str) -> list[str]:
    found = instructions(text)
    problems = []
    extras = set()
    for requirement in pip_install_args(found):
        match = re.search(r"\[([^\]]*)\]", requirement)
        if match:
            extras |= {extra.strip() for extra in match.group(1).split(",")}
    if not WORKER_EXTRAS.issubset(extras):
        problems.append(f"the worker image must install the extras {sorted(WORKER_EXTRAS)}")
    raw = [word for words in pip_installs(found) for word in words if "[" in word]
    if raw and not any("${" in word or "$" in word for word in raw):
        problems.append("the extras are not a build argument (`ARG EXTRAS=...`)")
    problems += wheels_problems(found)
    cmd = [exec_form(args) for keyword, args in final_stage(found) if keyword == "CMD"]
    if not cmd or cmd[-1] != WORKER_CMD:
        problems.append(f"CMD must be {json.dumps(WORKER_CMD)}")
    return problems


def wheels_problems(found: list[Instruction]) -> list[str]:
    """The wheels/ hook: torch from a wheel file there, then pinned to it for the extras."""
    problems = []
    copies = [args for keyword, args in found if keyword == "COPY" and "--from=" not in args]
    if not any(shlex.split(args)[0].rstrip("/") == "wheels" for args in copies):
        problems.append("no `COPY wheels/ ...`: a local torch wheel cannot reach the build")
    installs = pip_installs(found)
    from_file = [w for words in installs for w in words if re.search(r"/torch-[^/]*\.whl$", w)]
    if not from_file:
        problems.append("a torch wheel in wheels/ is not installed from its file")
    for words in installs:
        if any("[" in word for word in words) and not {"-c", "--constraint"} & set(words):
            problems.append("the extras install is not constrained to the installed torch")
    return problems


def ignored_by_docker(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (or a folder above it) out of the build context."""
    parts = Path(path).parts
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            ignored = not negated
    return ignored


def copy_source_problems(text: str, patterns: list[str]) -> list[str]:
    """Sources of COPY (from the build context) exist and are not excluded by .dockerignore."""
    problems = []
    for keyword, args in instructions(text):
        if keyword not in ("COPY", "ADD") or "--from=" in args:
            continue
        words = [word for word in shlex.split(args) if not word.startswith("--")]
        for source in words[:-1]:
            if not (ROOT / source).exists():
                problems.append(f"COPY {source}: not in the repository")
            elif ignored_by_docker(source, patterns):
                problems.append(f"COPY {source}: excluded by .dockerignore")
    return problems


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "hadolint"
    assert tool.exists(), f"{tool} is missing: install the dev extra (pip install -e '.[dev]')"
    return subprocess.run(
        [str(tool), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [API, WORKER, *STAND_INS], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(careless)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


@pytest.mark.parametrize("dockerfile", [API, WORKER], ids=lambda p: p.name)
def test_images_are_multistage_nonroot_and_healthchecked(dockerfile: Path) -> None:
    assert dockerfile_problems(dockerfile.read_text()) == []


def test_api_image_has_no_gpu_libraries() -> None:
    assert api_image_problems(API.read_text()) == []


def test_worker_image_installs_the_worker_extras() -> None:
    assert worker_image_problems(WORKER.read_text()) == []


@pytest.mark.parametrize("dockerfile", [API, WORKER], ids=lambda p: p.name)
def test_copied_sources_reach_the_build(dockerfile: Path) -> None:
    assert copy_source_problems(dockerfile.read_text(), dockerignore_patterns()) == []


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", ".env", "app/__pycache__/x.pyc", "var/checkpoints"):
        assert ignored_by_docker(path, patterns), path


GOOD = """\
ARG BASE_IMAGE=python:3.11.13-slim
FROM ${BASE_IMAGE} AS build
RUN pip install --no-cache-dir .
FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
HEALTHCHECK CMD ["gpufleet", "probe", "api"]
CMD ["gpufleet", "api", "--host", "0.0.0.0", "--port", "8000"]
"""


def test_the_checkers_accept_a_minimal_good_dockerfile() -> None:
    assert dockerfile_problems(GOOD) == []
    assert api_image_problems(GOOD) == []


@pytest.mark.parametrize(
    ("old", "new", "flagged"),
    [
        ("FROM ${BASE_IMAGE} AS build\n", "", "not multi-stage"),
        ("=python:3.11.13-slim\n", "=python:latest\n", "not pinned"),
        ("=python:3.11.13-slim\n", "=python\n", "not pinned"),
        ("FROM ${BASE_IMAGE}\n", "FROM python:3.11.13-slim\n", "must be ${BASE_IMAGE}"),
        ("ARG BASE_IMAGE=python:3.11.13-slim\n", "", "no global `ARG BASE_IMAGE"),
        ("ARG BASE", "# syntax=docker/dockerfile:1\nARG BASE", "`# syntax=` line"),
        ("USER 10001:10001\n", "", "no USER"),
        ("USER 10001:10001\n", "USER root\n", "runs as root"),
        ('HEALTHCHECK CMD ["gpufleet", "probe", "api"]\n', "", "no HEALTHCHECK"),
        ('HEALTHCHECK CMD ["gpufleet", "probe", "api"]\n', "HEALTHCHECK NONE\n", "no HEALTHCHECK"),
        ("RUN pip", "# hadolint ignore=DL3013\nRUN pip", "ignoring DL3013 without a reason"),
    ],
)
def test_dockerfile_checker_flags_a_broken_file(old: str, new: str, flagged: str) -> None:
    assert old in GOOD
    problems = dockerfile_problems(GOOD.replace(old, new))
    assert any(flagged in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("install", "flagged"),
    [
        ('"./[worker]"', "installs extras"),
        ("'.[tensorflow]'", "installs extras"),
        ("torch==2.13.0", "installs torch"),
        ("tensorflow-cpu==2.16.1 numpy==2.0.0", "installs tensorflow-cpu"),
        ("nvidia-ml-py==12.560.30", "installs nvidia-ml-py"),
    ],
)
def test_api_checker_flags_gpu_libraries(install: str, flagged: str) -> None:
    text = GOOD.replace("pip install --no-cache-dir .", f"pip install --no-cache-dir {install}")
    problems = api_image_problems(text)
    assert any(flagged in problem for problem in problems), problems


def test_api_checker_flags_another_command() -> None:
    text = GOOD.replace('"0.0.0.0", ', "")
    assert any("CMD must be" in problem for problem in api_image_problems(text))


def test_worker_checker_flags_missing_extras() -> None:
    text = WORKER.read_text().replace("worker,tensorflow,flower", "worker")
    assert text != WORKER.read_text()
    assert any("extras" in problem for problem in worker_image_problems(text))


def test_worker_checker_flags_extras_that_are_no_build_argument() -> None:
    text = WORKER.read_text().replace("${EXTRAS}", "worker,tensorflow,flower")
    assert text != WORKER.read_text()
    assert "the extras are not a build argument (`ARG EXTRAS=...`)" in worker_image_problems(text)


@pytest.mark.parametrize(
    ("old", "new", "flagged"),
    [
        ("COPY wheels/ /wheels/\n", "", "no `COPY wheels/"),
        ("/wheels/torch-*.whl \\", "torch \\", "not installed from its file"),
        ("--constraint /wheels/constraints.txt", "", "not constrained"),
    ],
)
def test_worker_checker_flags_a_broken_wheels_hook(old: str, new: str, flagged: str) -> None:
    text = WORKER.read_text()
    assert old in text
    problems = worker_image_problems(text.replace(old, new))
    assert any(flagged in problem for problem in problems), problems


def test_copy_checker_flags_an_ignored_source() -> None:
    text = "FROM python:3.11.13-slim\nCOPY tests ./tests\nCOPY nowhere ./nowhere\n"
    problems = copy_source_problems(text, dockerignore_patterns())
    assert "COPY tests: excluded by .dockerignore" in problems
    assert "COPY nowhere: not in the repository" in problems
