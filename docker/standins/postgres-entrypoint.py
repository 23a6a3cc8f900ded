"""What compose.yaml uses of the official postgres image's entrypoint, for the stand-in.

On an empty PGDATA: initdb with POSTGRES_USER as the superuser and the password in
POSTGRES_PASSWORD_FILE (scram-sha-256 over TCP, trust on the local socket), then
POSTGRES_DB is created and every *.sql of /docker-entrypoint-initdb.d is run with psql
as POSTGRES_USER on a server listening only on its socket. Then exec postgres on every
address.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

data = Path(os.environ.get("PGDATA", "/var/lib/postgresql/data"))
user = os.environ.get("POSTGRES_USER", "postgres")
db = os.environ.get("POSTGRES_DB", user)
if not (data / "PG_VERSION").exists():
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    password = Path(os.environ["POSTGRES_PASSWORD_FILE"]).read_text().strip()
    with tempfile.NamedTemporaryFile("w", dir="/tmp") as pw:
        pw.write(password + "\n")
        pw.flush()
        subprocess.run(
            [
                "initdb",
                "-D",
                str(data),
                "-U",
                user,
                f"--pwfile={pw.name}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write("host all all all scram-sha-256\n")
    setup = ["pg_ctl", "-D", str(data), "-w", "-o", "-c listen_addresses=''"]
    subprocess.run([*setup, "start"], check=True, stdout=subprocess.DEVNULL)
    if db != "postgres":
        subprocess.run(["createdb", "-U", user, db], check=True)
    for sql in sorted(Path("/docker-entrypoint-initdb.d").glob("*.sql")):
        subprocess.run(["psql", "-q", "-U", user, "-d", db, "-f", str(sql)], check=True)
    subprocess.run([*setup, "-m", "fast", "stop"], check=True, stdout=subprocess.DEVNULL)
args = sys.argv[1:] or ["postgres"]
if args[0] == "postgres":
    args = [*args, "-D", str(data), "-c", "listen_addresses=*"]
os.execvp(args[0], args)  # noqa: S606 - the server itself, as the official entrypoint
