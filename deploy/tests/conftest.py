"""Shared fixtures for the deploy/ and helm/ tests.

# Layout
- `repo`: the repository root; every path in the tests is relative to it.
- `helm` / `render`: a real Helm (run.sh installs it) and `helm template` parsed into
  manifests.
- `wsgate_binary`: the gateway built with the very `cargo build` command the Dockerfile
  runs, so the binary the tests exercise is the one the image ships. With
  `WSGATE_IMAGE_PROFILE=dev` (what `.ci/test` sets) the same command without `--release`:
  the same package, binary and features (features do not depend on the profile, and the
  test-only ones stay out because no test target is built), unoptimized, which spares the
  CI run a release build of its own (about five of its minutes on two cores).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "wsgate"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def helm() -> str:
    path = os.environ.get("HELM") or shutil.which("helm")
    assert path, "no helm: run deploy/tests/run.sh, which installs it"
    return path


class Rendered(list):
    """The manifests of one `helm template` run, with lookups by kind."""

    def of_kind(self, kind: str) -> list[dict]:
        return [m for m in self if m["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[m['metadata']['name'] for m in found]}"
        return found[0]


def helm_template(helm: str, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm, "template", "t", str(chart), "--namespace", "wsgate", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="session")
def render(helm):
    """render(*helm_args) -> Rendered manifests; fails the test if Helm refuses."""
    cache: dict[tuple, Rendered] = {}

    def _render(*args: str) -> Rendered:
        if args not in cache:
            res = helm_template(helm, *args)
            assert res.returncode == 0, f"helm template {args} failed:\n{res.stderr}"
            docs = [d for d in yaml.safe_load_all(res.stdout) if d]
            cache[args] = Rendered(docs)
        return cache[args]

    return _render


def dockerfile_build_command() -> list[str]:
    """The `cargo build ...` command of the Dockerfile's build stage, as argv."""
    lines = [l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    m = re.search(r"^RUN .*?(cargo build[^&\n]*)", text, re.M)
    assert m, "the Dockerfile has no cargo build command"
    return shlex.split(m.group(1))


@pytest.fixture(scope="session")
def wsgate_binary() -> Path:
    """Builds the gateway exactly as the Dockerfile does and returns the binary's path."""
    argv = dockerfile_build_command()
    profile = os.environ.get("WSGATE_IMAGE_PROFILE", "release")
    assert profile in ("release", "dev"), f"WSGATE_IMAGE_PROFILE={profile}: release or dev"
    if profile == "dev":
        argv = [a for a in argv if a != "--release"]
    subprocess.run(argv, cwd=REPO, check=True, timeout=3600)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    binary = target / ("release" if profile == "release" else "debug") / "wsgate"
    assert binary.is_file(), f"{argv} did not produce {binary}"
    return binary
