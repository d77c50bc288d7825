"""A team's tracking server, for real and throwaway: PostgreSQL (backend store), an S3-compatible
server (moto, the artifact store) and `mlflow server` over both, proxying the artifacts.

Clients talk to the MLflow server only: they get `mlflow-artifacts:/` URIs and need neither the S3
endpoint nor credentials, which only the server holds. Everything binds to 127.0.0.1 on free
ports. PostgreSQL comes from Debian (`apt-get install postgresql`, done by `.ci/run`); moto and
the drivers from the `distributed` extra.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .browser import free_port, mlflow_server, stop_group

# moto accepts any credentials; set for the MLflow server (and this module's S3 client) only.
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "mlflow"


def postgres_binaries() -> tuple[Path, Path] | None:
    """(initdb, pg_ctl): from PATH, else Debian's /usr/lib/postgresql/<version>/bin, newest first."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb), Path(pg_ctl)
    dirs = Path("/usr/lib/postgresql").glob("*/bin")
    for d in sorted(dirs, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, reverse=True):
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d / "initdb", d / "pg_ctl"
    return None


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: there, run its binaries as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres(tmp_dir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port with an empty `mlflow` database;
    yields its SQLAlchemy URI (trust auth, user `postgres`)."""
    import psycopg

    binaries = postgres_binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL's initdb/pg_ctl not found: apt-get install postgresql")
    initdb, pg_ctl = map(str, binaries)
    own_dir = os.geteuid() == 0
    if own_dir:
        # The `postgres` user cannot enter pytest's temp dirs (0700, root's): as root the cluster
        # lives in a directory of its own, owned by `postgres`, and its log is copied back.
        cluster = Path(tempfile.mkdtemp(prefix="pg-"))
        shutil.chown(cluster, "postgres", "postgres")
    else:
        cluster = tmp_dir / "postgres"
        cluster.mkdir(parents=True)
    data, log = cluster / "data", cluster / "server.log"
    port = free_port()
    run = {"cwd": cluster, "capture_output": True, "text": True, "start_new_session": True}
    try:
        p = subprocess.run(
            _as_postgres(
                [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale", "-N"]
            ),
            **run,
        )
        if p.returncode:
            raise RuntimeError(f"initdb failed ({p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        # A throwaway cluster: no fsync; the socket stays inside the cluster's directory.
        options = f"-p {port} -h 127.0.0.1 -k {cluster} -c fsync=off -c full_page_writes=off"
        p = subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]),
            **run,
        )
        if p.returncode:
            server_log = log.read_text()[-3000:] if log.exists() else "(no log)"
            raise RuntimeError(f"PostgreSQL did not start ({p.returncode}): {p.stderr[-1000:]}\n{server_log}")
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), **run)
        if own_dir:  # keep the log, drop the cluster
            with contextlib.suppress(OSError):
                shutil.copy(log, tmp_dir / "postgres.log")
            shutil.rmtree(cluster, ignore_errors=True)


def s3_client(endpoint_url: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
    )


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).parent / "moto_server"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*cmd, "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def s3_server(tmp_dir: Path, timeout_s: float = 60) -> Iterator[tuple[str, str]]:
    """moto's S3-compatible server on a free loopback port, with bucket `mlflow`;
    yields (endpoint URL, artifacts destination `s3://mlflow/artifacts`)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_dir / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            _moto_command(port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        client = s3_client(endpoint)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception as e:  # not listening yet: botocore's EndpointConnectionError
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server not up after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}"
                    ) from e
                time.sleep(0.3)
        yield endpoint, f"s3://{BUCKET}/artifacts"
    finally:
        stop_group(proc)


@dataclass(frozen=True)
class TeamServer:
    url: str  # what clients set MLFLOW_TRACKING_URI to: all they need
    postgres_uri: str  # SQLAlchemy URI of the backend store
    s3_endpoint: str
    bucket: str
    artifacts_destination: str  # s3://bucket/artifacts
    log: Path  # the MLflow server's output (its access log shows proxied downloads)

    @property
    def postgres_dsn(self) -> str:
        """The backend store as libpq (psycopg.connect) spells it."""
        return self.postgres_uri.replace("postgresql+psycopg://", "postgresql://", 1)

    def s3_keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`."""
        pages = (
            s3_client(self.s3_endpoint)
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextlib.contextmanager
def team_server(tmp_dir: Path, timeout_s: float = 120) -> Iterator[TeamServer]:
    """PostgreSQL + moto + `mlflow server --artifacts-destination s3://...`; the S3 endpoint and
    credentials go to the MLflow server's environment only. One worker: a test needs no more."""
    with postgres(tmp_dir) as pg_uri, s3_server(tmp_dir) as (endpoint, destination):
        env = {**FAKE_AWS, "MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_WORKERS": "1", "PYTHONUNBUFFERED": "1"}
        with mlflow_server(
            pg_uri, tmp_dir / "mlflow-server.log", timeout_s, artifacts_destination=destination, env=env
        ) as url:
            yield TeamServer(url, pg_uri, endpoint, BUCKET, destination, tmp_dir / "mlflow-server.log")
