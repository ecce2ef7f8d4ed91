"""The runtime image, without a container engine.

The binary is built with the Dockerfile's own `cargo build` line, the root filesystem
with the Dockerfile's own deploy/docker/make-rootfs.sh, and the result runs the way a
container would: in new PID and mount namespaces, tini as PID 1, chrooted into the
read-only root filesystem, as uid 65532, with the image's environment (listen addresses
moved to free loopback ports). Needs root (unshare, chroot); CI runs as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets

from conftest import DOCKERFILE, REPO
from helpers import free_port, http_status, wait_until

ROOTFS_SCRIPT = REPO / "deploy/docker/make-rootfs.sh"
TINI = Path("/usr/bin/tini-static")


def image_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (env_line,) = [l for l in text.splitlines() if l.startswith("ENV ")]
    return dict(re.findall(r"(WSGATE_\w+)=(\S+)", env_line))


def image_user() -> str:
    (user,) = [l.split()[1] for l in DOCKERFILE.read_text().splitlines() if l.startswith("USER ")]
    return user


@pytest.fixture(scope="module")
def rootfs(wsgate_binary, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image") / "rootfs"
    subprocess.run(["sh", str(ROOTFS_SCRIPT), str(wsgate_binary), str(TINI), str(out)], check=True)
    return out


def test_rootfs_holds_only_what_runs(rootfs):
    files = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file())
    assert "usr/local/bin/wsgate" in files and "usr/bin/tini" in files
    assert not any(f.endswith(("/sh", "/bash", "/curl", "/busybox")) for f in files), files
    libs = [f for f in files if ".so" in f]
    assert any("libc.so" in f for f in libs) and any("ld-linux" in f for f in libs), libs
    size = sum((rootfs / f).stat().st_size for f in files)
    print(f"runtime image content: {size / 1e6:.1f} MB in {len(files)} files")


@pytest.fixture
def container(rootfs):
    """Starts the image's entrypoint as a container would; yields (process, ports)."""
    if os.geteuid() != 0:
        pytest.fail("the image test needs root (unshare/chroot); CI runs as root")
    ws_port, admin_port = free_port(), free_port()
    env = {**image_env(),
           "WSGATE_LISTEN": f"127.0.0.1:{ws_port}",
           "WSGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "WSGATE_NODE_ID": "image-test",
           "WSGATE_DRAIN_TIMEOUT": "2s",
           # Docker's default PATH (the image sets none); also finds chroot on the host.
           "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    # The mount namespace gets a read-only bind of the rootfs (readOnlyRootFilesystem)
    # and its own /proc; `exec` makes tini PID 1 of the new PID namespace.
    script = ('set -e; r="$1"; mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"; '
              'mount -t proc proc "$r/proc"; '
              'exec chroot --userspec="$2" "$r" /usr/bin/tini -- /usr/local/bin/wsgate')
    (rootfs / "proc").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--propagation", "private",
         "sh", "-c", script, "sh", str(rootfs), image_user()],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, ws_port, admin_port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def pid1_of(unshare: subprocess.Popen) -> int:
    """Host pid of the namespace's PID 1 (tini): the child unshare forked."""
    def child():
        try:
            kids = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        return int(kids[0]) if kids else None
    pid = wait_until(lambda: child() or unshare.poll() is not None, timeout=10, what="unshare's child")
    assert unshare.poll() is None, unshare.communicate()[0]
    wait_until(lambda: unshare.poll() is not None or Path(f"/proc/{pid}/comm").read_text().strip() == "tini",
               timeout=10, what="tini to be PID 1")
    assert unshare.poll() is None, unshare.communicate()[0]
    return pid


def test_container_serves_probes_and_drains_on_sigterm(container):
    proc, ws_port, admin_port = container
    tini = pid1_of(proc)
    wait_until(lambda: http_status(f"http://127.0.0.1:{admin_port}/readyz") == 200,
               timeout=20, what="/readyz 200")
    assert http_status(f"http://127.0.0.1:{admin_port}/healthz") == 200
    assert http_status(f"http://127.0.0.1:{admin_port}/metrics") == 200
    # The gateway runs as the image's user, not as root.
    uids = Path(f"/proc/{tini}/task/{tini}/children").read_text().split()
    (gw,) = uids
    status = Path(f"/proc/{gw}/status").read_text()
    assert re.search(r"^Uid:\s+65532\s", status, re.M), status

    async def session():
        async with websockets.connect(f"ws://127.0.0.1:{ws_port}/ws") as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["op"] == "welcome" and welcome["node"] == "image-test"
            # SIGTERM to PID 1, as `docker stop` or the kubelet send it: tini forwards it.
            os.kill(tini, signal.SIGTERM)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), timeout=10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    assert asyncio.run(session()) == 1001
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "drain" in out
