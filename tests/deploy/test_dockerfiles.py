"""The Dockerfiles, parsed: build context, stages, user, ports, env and a health check run for real."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway import config as gateway_config
from ranking_service import config as ranking_config
from retrieval_service import config as retrieval_config
from tests.deploy import PROGRAM_ENV_VARS, PROJECT_PREFIXES, REPO_ROOT, foreign_names

DEPLOY = REPO_ROOT / "deploy"


@dataclass(frozen=True)
class Image:
    module: str                      # the program: python -m <module>
    config: ModuleType | None        # its config module (services only)
    gpu: bool


IMAGES = {
    "Dockerfile.retrieval": Image("retrieval_service", retrieval_config, gpu=False),
    "Dockerfile.ranking": Image("ranking_service", ranking_config, gpu=False),
    "Dockerfile.trainer": Image("trainer", None, gpu=False),
    "Dockerfile.retrieval.gpu": Image("retrieval_service", retrieval_config, gpu=True),
    "Dockerfile.trainer.gpu": Image("trainer", None, gpu=True),
    "Dockerfile.gateway": Image("gateway", gateway_config, gpu=False),
}
SERVICE_IMAGES = [name for name, image in IMAGES.items() if image.config is not None and image.module != "gateway"]


@dataclass(frozen=True)
class Instruction:
    keyword: str   # upper case: FROM, RUN, COPY, ...
    args: str      # the rest, continuation lines joined


@dataclass(frozen=True)
class Stage:
    base: str                        # FROM's image, global ARGs substituted
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


@dataclass(frozen=True)
class Dockerfile:
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def external_base(self, stage: Stage) -> str:
        """The registry image a stage starts from, following FROM <earlier stage> links."""
        names = {s.name: s for s in self.stages if s.name}
        while stage.base in names:
            stage = names[stage.base]
        return stage.base


def parse_dockerfile(path: Path) -> Dockerfile:
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for line in filter(str.strip, text.splitlines()):
        keyword, _, args = line.strip().partition(" ")
        instruction = Instruction(keyword.upper(), re.sub(r"\s+", " ", args).strip())
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            current = []
            stages.append(Stage(base, name, ()))
        elif current is None:
            assert instruction.keyword == "ARG", f"{path.name}: only ARG may precede FROM, got {line!r}"
            key, _, default = instruction.args.partition("=")
            global_args[key] = default
        else:
            stages[-1] = Stage(stages[-1].base, stages[-1].name, stages[-1].instructions + (instruction,))
    return Dockerfile(tuple(stages))


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(.dockerignore) as (negated, regex) in file order; the last pattern that matches decides."""
    patterns = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        patterns.append((negated, re.compile(regex)))
    return patterns


def in_build_context(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    # Like Docker, a pattern that matches a parent folder matches everything inside it.
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


def load(name: str) -> Dockerfile:
    return parse_dockerfile(DEPLOY / name)


def test_every_dockerfile_is_checked():
    assert {p.name for p in DEPLOY.glob("Dockerfile*")} == set(IMAGES)


@pytest.mark.parametrize("name", IMAGES)
def test_builder_venv_is_copied_into_runtime(name):
    dockerfile = load(name)
    builder = dockerfile.stage("builder")
    install = " ".join(builder.all("RUN"))
    assert "-m venv /opt/venv" in install
    assert "/opt/venv/bin/pip install" in install and "requirements" in install
    assert "COPY --from=builder /opt/venv /opt/venv" in [f"COPY {a}" for a in dockerfile.final.all("COPY")]
    assert env_of(dockerfile.final)["PATH"].startswith("/opt/venv/bin:")
    # The runtime stage installs no build tools: everything pip built stays in the builder.
    assert not any("pip install" in run for run in dockerfile.final.all("RUN"))


@pytest.mark.parametrize("name", IMAGES)
def test_base_images(name):
    dockerfile = load(name)
    base = dockerfile.external_base(dockerfile.final)
    if IMAGES[name].gpu:
        assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu22\.04", base), base
        python = dockerfile.stage("python")
        assert "python3.11" in " ".join(python.all("RUN"))
        assert dockerfile.stage("builder").base == "python" and dockerfile.final.base == "python"
    else:
        assert [s.base for s in dockerfile.stages] == ["python:3.11-slim", "python:3.11-slim"]


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist_and_are_in_the_build_context(name):
    patterns = dockerignore_patterns()
    copies = [shlex.split(args) for args in sum((s.all("COPY") for s in load(name).stages), [])]
    local = [words for words in copies if not words[0].startswith("--from=")]
    assert local
    for words in local:
        for source in words[:-1]:
            path = REPO_ROOT / source
            assert path.exists(), f"{name}: COPY source {source} is missing"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            wanted = [p.relative_to(REPO_ROOT).as_posix() for p in files
                      if "__pycache__" not in p.parts and p.suffix != ".pyc"]
            assert wanted, f"{name}: COPY source {source} is empty"
            excluded = [f for f in wanted if not in_build_context(f, patterns)]
            assert excluded == [], f"{name}: .dockerignore drops {excluded}"


def test_build_context_is_an_allow_list():
    patterns = dockerignore_patterns()
    for path in (".git/config", ".venv/bin/python", "tests/conftest.py", "artifacts/CURRENT",
                 "trainer/__pycache__/x.cpython-311.pyc", "docker-compose.yml", "deploy/k8s/base/redis.yaml"):
        assert not in_build_context(path, patterns), path
    for path in ("requirements.txt", "requirements-serving.txt", "deploy/requirements-gpu.txt",
                 "recsys_contracts/v1/common_pb2.py", "recsys_serving/reload.py"):
        assert in_build_context(path, patterns), path


def project_imports(package: str) -> set[str]:
    """The project packages ``package`` needs at run time: its own and every one its code imports, transitively."""
    from tests.test_import_rules import PROJECT_PACKAGES, _imported_top_level

    needed, todo = set(), [package]
    while todo:
        current = todo.pop()
        needed.add(current)
        for path in (REPO_ROOT / current).rglob("*.py"):
            todo += sorted((_imported_top_level(path) & PROJECT_PACKAGES) - needed - set(todo))
    return needed


@pytest.mark.parametrize("name", IMAGES)
def test_program_and_its_packages_are_copied(name):
    image = IMAGES[name]
    final = load(name).final
    assert exec_form(final.all("ENTRYPOINT")[0]) == ["python", "-m", image.module]
    copied = {shlex.split(args)[-1] for args in final.all("COPY")}
    assert {f"/app/{package}/" for package in project_imports(image.module)} <= copied
    assert (REPO_ROOT / image.module / "__init__.py").is_file()
    assert env_of(final)["PYTHONPATH"] == "/app"


@pytest.mark.parametrize("name", IMAGES)
def test_entry_module_has_a_main(name):
    module = IMAGES[name].module
    if not (REPO_ROOT / module / "__main__.py").is_file():
        pytest.skip(f"{module}/__main__.py is not written yet (its own work item); "
                    f"the image's ENTRYPOINT python -m {module} needs it")
    assert (REPO_ROOT / module / "__main__.py").read_text().strip()


@pytest.mark.parametrize("name", IMAGES)
def test_expose_matches_config_defaults(name):
    image = IMAGES[name]
    exposed = {int(port) for args in load(name).final.all("EXPOSE") for port in args.split()}
    if image.config is None:
        assert exposed == set()
    else:
        defaults = image.config.from_env({"RECSYS_ARTIFACT_ROOT": "/artifacts"})
        # the gateway serves /metrics on its HTTP port
        assert exposed == {defaults.port, getattr(defaults, "metrics_port", defaults.port)}


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_non_root_uid_10001(name):
    final = load(name).final
    user = final.all("USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid == "10001" and gid == "10001", "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    assert any("useradd" in run and "--uid 10001" in run for run in final.all("RUN"))
    # USER comes after every RUN: nothing at run time is root.
    keywords = [i.keyword for i in final.instructions]
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < keywords.index("USER")


@pytest.mark.parametrize("name", IMAGES)
def test_ready_for_a_read_only_root_filesystem(name):
    final = load(name).final
    env = env_of(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert any("compileall" in run for run in final.all("RUN")), "byte-compile at build time"
    writable = {key: value for key, value in env.items()
                if key in {"HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR",
                           "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"}}
    assert {"HOME", "XDG_CACHE_HOME"} <= set(writable)
    if name not in ("Dockerfile.ranking", "Dockerfile.retrieval", "Dockerfile.gateway"):  # images with torch
        assert "TORCHINDUCTOR_CACHE_DIR" in writable
    assert all(value == "/tmp" or value.startswith("/tmp/") for value in writable.values()), writable
    if IMAGES[name].module == "trainer":
        assert env["MPLCONFIGDIR"].startswith("/tmp/")


@pytest.mark.parametrize("name", IMAGES)
def test_project_env_names_are_read_by_the_program(name):
    env = env_of(load(name).final)
    names = {key for key in env if key.startswith(PROJECT_PREFIXES)}
    assert ("RECSYS_ARTIFACT_ROOT" in names) == ("RECSYS_ARTIFACT_ROOT" in PROGRAM_ENV_VARS[IMAGES[name].module])
    assert foreign_names(IMAGES[name].module, names) == set()
    if IMAGES[name].config is not None:
        IMAGES[name].config.from_env({k: env[k] for k in names})


@pytest.mark.parametrize("name", IMAGES)
def test_no_index_or_registry_host_is_written_in(name):
    assert "://" not in (DEPLOY / name).read_text()


def test_the_gateway_image_installs_no_torch():
    runs = " ".join(load("Dockerfile.gateway").stage("builder").all("RUN"))
    pattern = re.search(r"grep -E '([^']+)'", runs)
    assert pattern and "-r /build/requirements-gateway.txt" in runs, runs
    assert "/build/requirements-serving.txt /build/requirements.txt" in runs
    lines = [line for name in ("requirements-serving.txt", "requirements.txt")
             for line in (REPO_ROOT / name).read_text().splitlines()]
    kept = {line.partition("==")[0] for line in lines if re.search(pattern.group(1), line)}
    assert kept == {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "prometheus-client",
                    "fastapi", "uvicorn", "swagger-ui-bundle", "Jinja2"}
    assert "TORCH_INDEX_URL" not in (DEPLOY / "Dockerfile.gateway").read_text()


def test_cpu_trainer_image_takes_torch_from_the_index_passed_in():
    builder = load("Dockerfile.trainer").stage("builder")
    assert "TORCH_INDEX_URL" in builder.all("ARG")
    runs = " ".join(builder.all("RUN"))
    assert 'test -n "$TORCH_INDEX_URL"' in runs, "fail the build rather than pull the CUDA torch"
    assert '--extra-index-url "$TORCH_INDEX_URL" -r /build/requirements.txt' in runs


@pytest.mark.parametrize("name", ["Dockerfile.ranking", "Dockerfile.retrieval"])
def test_cpu_service_images_install_no_torch(name):
    """Serving runs ONNX programs with onnxruntime: the service images carry the serving pins only."""
    builder = load(name).stage("builder")
    runs = " ".join(builder.all("RUN"))
    assert "-r /build/requirements-serving.txt" in runs and "/build/requirements.txt" not in runs
    assert "TORCH_INDEX_URL" not in builder.all("ARG")
    serving = requirement_pins(REPO_ROOT / "requirements-serving.txt")
    assert "torch" not in serving and {"onnxruntime", "onnx", "cryptography"} <= set(serving)


def test_requirements_txt_includes_the_serving_pins():
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert "-r requirements-serving.txt" in lines
    assert not set(requirement_pins(REPO_ROOT / "requirements.txt")) & set(
        requirement_pins(REPO_ROOT / "requirements-serving.txt")), "each pin lives in one file"


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not pinned with =="
            pins[name.lower()] = version
    return pins


def test_gpu_requirements_replace_exactly_the_cpu_builds():
    cpu = requirement_pins(REPO_ROOT / "requirements.txt") | requirement_pins(REPO_ROOT / "requirements-serving.txt")
    gpu = requirement_pins(DEPLOY / "requirements-gpu.txt")
    assert set(gpu) == {"torch", "faiss-gpu"}
    assert gpu["torch"] == cpu["torch"]
    assert gpu["faiss-gpu"] == cpu["faiss-cpu"], "same FAISS version: same index format and API"


@pytest.mark.parametrize("name", [n for n, image in IMAGES.items() if image.gpu])
def test_gpu_images_filter_out_the_cpu_builds(name):
    runs = " ".join(load(name).stage("builder").all("RUN"))
    pattern = re.search(r"grep -v -E '([^']+)'", runs)
    assert pattern, runs
    sources = ["requirements-serving.txt"] + (["requirements.txt"] if "trainer" in name else [])
    for source in sources:
        assert f"/build/{source}" in runs
    lines = [line for source in sources for line in (REPO_ROOT / source).read_text().splitlines()]
    dropped = {line.partition("==")[0] for line in lines if re.search(pattern.group(1), line)}
    assert dropped - {"-r requirements-serving.txt"} == {"torch", "faiss-cpu"} & {
        line.partition("==")[0] for line in lines}
    assert "faiss-cpu" in dropped
    assert "-r /build/requirements-common.txt -r /build/requirements-gpu.txt" in runs
    assert "--extra-index-url" not in runs, "PyPI's default torch wheel is the CUDA build"


def test_trainer_images_have_no_health_check():
    for name in ("Dockerfile.trainer", "Dockerfile.trainer.gpu"):
        assert load(name).final.all("HEALTHCHECK") == ["NONE"]


def healthcheck_code(name: str) -> str:
    (args,) = load(name).final.all("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    return argv[2]


def run_check(code: str, env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(PROJECT_PREFIXES)}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                          timeout=60).returncode


@pytest.mark.parametrize("name", SERVICE_IMAGES)
def test_health_check_follows_the_serving_status(name):
    code = healthcheck_code(name)
    prefix = IMAGES[name].config.PREFIX  # type: ignore[union-attr]
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        env = {f"{prefix}PORT": str(port)}
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_check(code, env) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_check(code, env) == 1
    finally:
        server.stop(None)
    assert run_check(code, env) == 1, "nothing listening: unhealthy"


@pytest.mark.parametrize("name", SERVICE_IMAGES)
def test_health_check_defaults_to_the_config_port(name):
    config = IMAGES[name].config.from_env({"RECSYS_ARTIFACT_ROOT": "/artifacts"})  # type: ignore[union-attr]
    prefix = IMAGES[name].config.PREFIX  # type: ignore[union-attr]
    assert f"os.environ.get('{prefix}PORT') or '{config.port}'" in healthcheck_code(name)


def test_gateway_health_check_follows_readyz():
    import http.server
    import threading

    code = healthcheck_code("Dockerfile.gateway")
    assert "os.environ.get('GATEWAY_PORT') or '8080'" in code
    status = [200]

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(status[0] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"GATEWAY_PORT": str(server.server_address[1])}
    try:
        assert run_check(code, env) == 0
        status[0] = 503
        assert run_check(code, env) != 0
    finally:
        server.shutdown()
        server.server_close()
    assert run_check(code, env) != 0, "nothing listening: unhealthy"
