"""deploy/Dockerfile, checked without a container engine.

Static checks read the Dockerfile; test_image.py builds the same binary and runtime
filesystem and runs them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

from conftest import DOCKERFILE, REPO, dockerfile_build_command

TEXT = DOCKERFILE.read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [l for l in TEXT.splitlines() if not l.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_multi_stage_build_into_an_empty_image():
    build, runtime = stages()
    assert re.match(r"rust:\$\{RUST_VERSION\}-bookworm AS build", build[0][1])
    assert runtime[0] == ("FROM", "scratch")
    # The runtime stage takes only the assembled root filesystem from the build stage.
    copies = [a for i, a in runtime if i == "COPY"]
    assert copies == ["--from=build /rootfs/ /"]
    assert not [a for i, a in runtime if i == "RUN"], "scratch has nothing to RUN with"


def test_rust_version_satisfies_the_workspace():
    (arg,) = [a for i, a in instructions() if i == "ARG" and a.startswith("RUST_VERSION=")]
    image = tuple(int(x) for x in arg.split("=")[1].split("."))
    ws = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"]
    assert image >= tuple(int(x) for x in ws.split("."))


def test_build_command_is_the_release_gateway_and_feeds_the_rootfs():
    argv = dockerfile_build_command()
    assert argv[:2] == ["cargo", "build"]
    assert {"--locked", "--release"} <= set(argv)
    assert argv[argv.index("-p") + 1] == "wsgate"
    assert argv[argv.index("--bin") + 1] == "wsgate"
    # The binary that build produces is the one make-rootfs.sh puts in the image.
    assert "make-rootfs.sh target/release/wsgate /usr/bin/tini-static /rootfs" in TEXT
    # The target dir is a cache mount at the path the relative target/ resolves to.
    assert "WORKDIR /src" in TEXT and "target=/src/target" in TEXT


def test_runtime_is_non_root_with_tini_as_pid_1():
    _, runtime = stages()
    d = dict(runtime)
    user, group = d["USER"].split(":")
    assert int(user) != 0 and int(group) != 0, "numeric and non-root, for runAsNonRoot"
    assert json.loads(d["ENTRYPOINT"]) == ["/usr/bin/tini", "--", "/usr/local/bin/wsgate"]
    assert d["STOPSIGNAL"] == "SIGTERM"


def test_listens_on_all_interfaces_on_the_exposed_ports():
    _, runtime = stages()
    env = dict(re.findall(r"(WSGATE_\w+)=(\S+)", dict(runtime)["ENV"]))
    exposed = set(dict(runtime)["EXPOSE"].split())
    assert env["WSGATE_LISTEN"] == "0.0.0.0:8080"
    assert env["WSGATE_ADMIN_LISTEN"] == "0.0.0.0:9090"
    assert exposed == {"8080", "9090"}
    assert env["WSGATE_LOG_FORMAT"] == "json"


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [p.strip() for p in (REPO / "deploy/Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        # Docker's rules, for the patterns used: a pattern matching a directory excludes
        # everything under it; "**/" matches any number of leading directories.
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for p in patterns:
            alts = [p, p[3:]] if p.startswith("**/") else [p]
            for prefix in prefixes:
                for alt in alts:
                    if fnmatch.fnmatch(prefix, alt) or (p.startswith("**/") and fnmatch.fnmatch(prefix, "*/" + alt)):
                        return True
        return False

    members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
    needed = ["Cargo.toml", "Cargo.lock", "deploy/docker/make-rootfs.sh"]
    needed += [f"{m}/Cargo.toml" for m in members] + [f"{m}/src/main.rs" for m in members if (REPO / m / "src/main.rs").exists()]
    needed += [f"{m}/src/lib.rs" for m in members if (REPO / m / "src/lib.rs").exists()]
    # The gateway embeds the browser client and the demo page (include_str!).
    needed += ["clients/js/wsgate.js", "clients/js/demo/index.html"]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not ignored(path), f"{path} is excluded from the build context"
    assert ignored("target/release/wsgate") and ignored("crates/x/target/debug/y")
