"""Start nginx on a loopback port for benchmarks (a real, fast upstream in its own process)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from meshcore.testing import free_port, wait_listening

CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    {servers}
}}
"""
SERVER = 'server {{ listen 127.0.0.1:{port}; location / {{ add_header x-upstream "{name}"; return 200 "ok"; }} }}'


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )


@contextmanager
def nginx(count: int = 1) -> Iterator[list[int]]:
    """`count` nginx servers (one worker process) on free loopback ports; yields the ports."""
    binary = nginx_binary()
    if binary is None:
        raise SystemExit("nginx is not installed (Debian package nginx)")
    ports = [free_port() for _ in range(count)]
    with tempfile.TemporaryDirectory() as prefix:
        servers = "\n    ".join(SERVER.format(port=p, name=f"n{i + 1}") for i, p in enumerate(ports))
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(CONF.format(prefix=prefix, servers=servers))
        proc = subprocess.Popen([binary, "-c", conf, "-p", prefix], stderr=subprocess.DEVNULL)
        try:
            for port in ports:
                try:
                    wait_listening(port, process=proc)
                except RuntimeError as exc:
                    raise SystemExit(f"nginx did not start: {exc}") from None
            yield ports
        finally:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
