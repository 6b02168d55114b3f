"""The Docker image definition: hadolint, the properties the deployment issue asks for, and its build context.

No Docker engine runs on CI machines, so the image is not built here. Instead these tests pin the Dockerfile to what
CI does prove: the same install command as .ci/run, nvcc flags only in CMakeLists.txt (sm_90a), every COPY source
present and not excluded by .dockerignore, and the HEALTHCHECK script exercised against a closed port (the live
tests run it against a real server).
"""

from __future__ import annotations

import fnmatch
import re
import sys
import tomllib

from tests.deploy_fixtures import (
    DOCKERFILE, HEALTHCHECK_SCRIPT, INSTALL_COMMAND, REPO_ROOT, dockerfile_stages, run, tool,
)
from tests.service_fixtures import free_port


PYPROJECT_BUILD = " ".join(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]["requires"])


def stages():
    return dockerfile_stages(DOCKERFILE.read_text())


def instructions(stage, name):
    return [args for instruction, args in stage if instruction == name]


def test_dockerfile_passes_hadolint():
    result = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install python3\nRUN cd /src && make\n")
    result = run([tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0 and "DL3007" in result.stdout  # ':latest' tag


def test_build_stage_compiles_the_extension_with_the_ci_install_command():
    build, runtime = stages()[1], stages()[-1]
    assert len(stages()) == 3, "two stages: build and runtime"
    assert re.search(r"nvidia/cuda:\S*-devel-", instructions(build, "FROM")[0]), "build stage needs the CUDA toolkit"
    assert instructions(build, "FROM")[0].endswith(" AS build")
    runs = " ".join(instructions(build, "RUN"))
    assert INSTALL_COMMAND in runs
    assert "torch==${TORCH_VERSION}" in runs and "tomllib" in runs, "deps (torch + pyproject's) before the build"
    assert "extension.is_built()" in runs, "the build must fail when the extension was silently skipped"
    # CI (.ci/run -> scripts/test.sh -> scripts/setup.sh) builds through the same backend invocation
    ci_chain = [REPO_ROOT / ".ci" / "run", REPO_ROOT / "scripts" / "test.sh", REPO_ROOT / "scripts" / "setup.sh"]
    for caller, callee in zip(ci_chain, ci_chain[1:]):
        assert callee.name in caller.read_text(), f"{caller.name} no longer runs {callee.name}: update this test"
    ci_install = re.findall(r"pip[ _]install (--no-build-isolation [^\n]*)", ci_chain[-1].read_text())
    assert ci_install, "CI's install must build with --no-build-isolation, as the image does"
    for requirement in ("scikit-build-core", "pybind11", "cmake", "ninja"):
        assert requirement in ci_chain[-1].read_text() and (requirement in runs or requirement in PYPROJECT_BUILD)
    # nvcc flags live in CMakeLists.txt only, so the image and CI compile the same code for the same target
    assert "-gencode=arch=compute_90a,code=sm_90a" in (REPO_ROOT / "CMakeLists.txt").read_text()
    assert not re.search(r"-gencode|CMAKE_CUDA_ARCHITECTURES|STATICMOE_EXTRA_NVCC_FLAGS", runs)
    assert re.search(r"nvidia/cuda:\S*-(base|runtime)-", instructions(runtime, "FROM")[0]), "slim runtime stage"
    assert "--from=build /opt/venv /opt/venv" in instructions(runtime, "COPY")


def test_runtime_stage_runs_as_non_root_with_health_check_and_read_only_model_volume():
    runtime = stages()[-1]
    user = instructions(runtime, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (Kubernetes runAsNonRoot can verify it)"
    assert any(f"--uid {uid}" in r for r in instructions(runtime, "RUN")), "the user exists in the image"
    healthcheck = instructions(runtime, "HEALTHCHECK")[-1]
    assert "/usr/local/lib/staticmoe/healthcheck.py" in healthcheck
    assert f"deploy/docker/healthcheck.py /usr/local/lib/staticmoe/healthcheck.py" in instructions(runtime, "COPY")
    start_period = re.search(r"--start-period=(\d+)(m|s)", healthcheck)
    assert start_period and int(start_period[1]) * (60 if start_period[2] == "m" else 1) >= 600, "model load time"
    assert '"/models"' in instructions(runtime, "VOLUME")[-1]
    env = " ".join(instructions(runtime, "ENV"))
    for setting in ("STATICMOE_MODEL=/models", "STATICMOE_HOST=0.0.0.0", "STATICMOE_PORT=8000", "HF_HUB_OFFLINE=1"):
        assert setting in env
    assert instructions(runtime, "ENTRYPOINT") == ['["staticmoe"]'] and instructions(runtime, "CMD") == ['["serve"]']
    assert instructions(runtime, "EXPOSE") == ["8000"]


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pattern.lstrip("/").replace("**/", "*")) or fnmatch.fnmatch(p, pattern)
               for pattern in patterns for p in prefixes)


def test_every_copy_source_exists_and_is_sent_in_the_build_context():
    patterns = dockerignore_patterns()
    assert ignored("build/x", patterns) and ignored("model/kernels/_C.so", patterns)  # the matcher itself works
    sources = []
    for stage in stages():
        for args in instructions(stage, "COPY"):
            if args.startswith("--from="):
                continue
            sources.extend(args.split()[:-1])
    assert "csrc" in sources and "model" in sources and "service" in sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: missing from the repository"
        assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert not ignored("service/static/dashboard.html", patterns), "the built-in dashboard page must ship"


def test_healthcheck_reads_empty_variables_as_unset():
    """STATICMOE_PORT= (compose's ${X:-}) is unset for the server, which then listens on 8000; the probe went to
    http://127.0.0.1:/health and failed on a healthy container."""
    env = {"STATICMOE_PORT": "", "STATICMOE_HEALTH_HOST": "", "STATICMOE_HEALTH_TIMEOUT": ""}
    result = run([sys.executable, str(HEALTHCHECK_SCRIPT)], env=env, timeout=30)
    assert "http://127.0.0.1:8000/health" in result.stderr + result.stdout or result.returncode == 0, result.stderr


def test_healthcheck_script_fails_when_nothing_listens():
    port = free_port()
    result = run([sys.executable, str(HEALTHCHECK_SCRIPT)], env={"STATICMOE_PORT": str(port)}, timeout=30)
    assert result.returncode == 1 and "unhealthy" in result.stderr
