"""The release binary, built with the Dockerfile's own `cargo build` line: what only the
tests may use is not in it.

`rediss://…#insecure` (Redis TLS without certificate verification) exists behind the
`insecure-tls` cargo feature, which only the test build turns on (a dev-dependency of
the wsgate crate). The image's binary must refuse such a URL at start, with exit code 2
and a message, and must not even link the redis crate's accept-anything verifier.
"""

from __future__ import annotations

import os
import subprocess


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("WSGATE_", "OTEL_"))}


def test_an_insecure_redis_url_is_refused_at_start(wsgate_binary):
    res = subprocess.run(
        [str(wsgate_binary), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--redis-url", "rediss://127.0.0.1:1/#insecure"],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )
    assert res.returncode == 2, res.stderr
    assert "invalid configuration" in res.stderr, res.stderr
    assert "#insecure" in res.stderr and "not built into this binary" in res.stderr, res.stderr


def test_without_the_fragment_the_url_passes_that_check(wsgate_binary):
    # The control: the same URL without the fragment passes the start-up checks (the node
    # would start and wait for Redis); a CA file that does not exist is what stops it.
    res = subprocess.run(
        [str(wsgate_binary), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--redis-url", "rediss://127.0.0.1:1/", "--redis-ca-file", "/nonexistent/ca.pem"],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )
    assert res.returncode == 2, res.stderr
    assert "--redis-ca-file" in res.stderr and "#insecure" not in res.stderr, res.stderr


def test_no_certificate_bypass_is_linked(wsgate_binary):
    symbols = subprocess.run(["nm", "-C", str(wsgate_binary)], capture_output=True, text=True,
                             check=True).stdout
    assert "rustls" in symbols, "nm sees the binary's symbols"
    assert "NoCertificateVerification" not in symbols
