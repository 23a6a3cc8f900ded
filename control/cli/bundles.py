"""``toolplane ledger export | verify-bundle | trust``: offline evidence bundles.

``export`` is a user command (through the API); ``verify-bundle`` runs offline (no
database, broker, network or settings); ``trust`` is an operator command that writes
the trust file an auditor pins: the checkpoint verifier key and the public keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from control.cli.output import console, print_json
from control.cli.support import JsonOpt, handled
from control.cli.support import client as _client
from control.cli.support import plane as _plane
from control.errors import EXIT_ERROR, EXIT_OK, UsageError

__all__ = [
    "ledger_export",
    "ledger_trust",
    "ledger_verify_bundle",
    "read_hmac_secrets",
    "read_trust",
    "witness",
]

TRUST_FORMAT = "toolplane-trust/1"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@handled
def ledger_export(
    run: Annotated[str, typer.Argument(help="The run whose evidence to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle file to write.")],
    json_: JsonOpt = False,
) -> None:
    """Write a run's offline evidence bundle: its events, an inclusion proof of each
    against a signed checkpoint, and the keys that signed its envelopes and receipts."""
    with _client() as client:
        data = client.export_bundle(run)
    _write(out, data)
    if json_:
        print_json({"run_id": run, "out": str(out), "bytes": len(data)})
    else:
        console.print(f"{out}: {len(data)} bytes", markup=False)


def read_trust(path: Path) -> tuple[list[str], list[dict[str, Any]] | None, list[str]]:
    """The checkpoint verifier keys, the pinned public keys and the witness keys of a
    trust file."""
    try:
        trust = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: {e}", field="--trust") from e
    if not isinstance(trust, dict) or trust.get("format") != TRUST_FORMAT:
        raise UsageError(f"{path}: not a {TRUST_FORMAT} file", field="--trust")
    vkeys, keys = trust.get("checkpoint_keys"), trust.get("keys")
    if not isinstance(vkeys, list) or not all(isinstance(v, str) for v in vkeys):
        raise UsageError("checkpoint_keys: not a list of verifier keys", field="--trust")
    if keys is not None and not isinstance(keys, list):
        raise UsageError("keys: not a list", field="--trust")
    witnesses = trust.get("witness_keys", [])
    if not isinstance(witnesses, list) or not all(isinstance(w, str) for w in witnesses):
        raise UsageError("witness_keys: not a list of witness keys", field="--trust")
    return vkeys, keys, witnesses


@handled
def ledger_verify_bundle(
    file: Annotated[Path, typer.Argument(help="The bundle to check.")],
    trust: Annotated[
        Path | None,
        typer.Option(help="A trust file (toolplane ledger trust): checkpoint and public keys."),
    ] = None,
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="A checkpoint verifier key (name+id+key); repeatable."),
    ] = None,
    witness_key: Annotated[
        list[str] | None,
        typer.Option("--witness-key", help="A witness that must have cosigned; repeatable."),
    ] = None,
    hmac_secret: Annotated[
        list[str] | None,
        typer.Option(
            "--hmac-secret",
            help="TOOL=FILE or KEY_ID=FILE: an HMAC receipt key's secret (base64, as in the "
            "key store's keys/private/); repeatable. Without, HMAC receipts are reported as "
            "not verifiable by a third party.",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Check a bundle offline (no database, broker or network): the checkpoint's signature
    against keys you trust, each event's inclusion proof, each envelope's and receipt's
    signature and each receipt's binding to its envelope. Names each part that fails.
    An HMAC receipt is checked only with its secret; without, it is named in a note (and
    in `receipts_not_verifiable`), and the exit status is still 0 if all else verifies."""
    from ledger.bundle_check import MAX_BUNDLE, check_bundle
    from ledger.cosignature import CosignatureVerifier
    from ledger.note import NoteError, NoteVerifier

    vkeys, pinned, wkeys = read_trust(trust) if trust is not None else ([], None, [])
    vkeys = [*vkeys, *(key or [])]
    try:
        witnesses = [CosignatureVerifier.parse(w) for w in [*wkeys, *(witness_key or [])]]
    except NoteError as e:
        raise UsageError(str(e), field="--witness-key") from e
    if not vkeys:
        raise UsageError("give the checkpoint's verifier key: --key or --trust", field="--key")
    try:
        verifiers = [NoteVerifier.parse(v) for v in vkeys]
    except NoteError as e:
        raise UsageError(str(e), field="--key") from e
    try:
        with file.open("rb") as f:  # no further than the limit: check_bundle names the size
            data = f.read(MAX_BUNDLE + 1)
    except OSError as e:
        raise UsageError(f"{file}: {e.strerror}", field="FILE") from e
    secrets = read_hmac_secrets(hmac_secret or [])
    report = check_bundle(data, verifiers, pinned, witnesses, secrets)
    if json_:
        print_json(report.as_dict())
    else:
        verdict = "ok" if report.ok else "BROKEN"
        console.print(
            f"bundle {verdict}: run {report.run_id}, {report.events} events in "
            f"{report.origin} (tree size {report.tree_size}), {report.envelopes} envelopes and "
            f"{report.receipts} receipts verified"
            + (
                f", {len(report.unverifiable)} HMAC receipts not verifiable without the secret"
                if report.unverifiable
                else ""
            )
            + (f", cosigned by {', '.join(report.witnesses)}" if report.witnesses else ""),
            markup=False,
        )
        for problem in report.problems:
            console.print(f"  {problem}", markup=False)
        for note in report.notes:
            console.print(f"  note: {note}", markup=False)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_ERROR)


def read_hmac_secrets(options: list[str]) -> dict[str, list[bytes]]:
    """``--hmac-secret`` options, ``TOOL=FILE`` or ``KEY_ID=FILE``: the secrets by name."""
    from toolplane.errors import SignatureError
    from toolplane.signing import b64decode

    secrets: dict[str, list[bytes]] = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise UsageError(
                f"{option!r}: expected TOOL=FILE or KEY_ID=FILE", field="--hmac-secret"
            )
        try:
            secret = b64decode(Path(path).read_text().strip())
        except OSError as e:
            raise UsageError(f"{path}: {e.strerror}", field="--hmac-secret") from e
        except (SignatureError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: not a base64 secret: {e}", field="--hmac-secret") from e
        if len(secret) < 16:
            raise UsageError(f"{path}: a secret of at least 16 bytes", field="--hmac-secret")
        secrets.setdefault(name, []).append(secret)
    return secrets


@handled
def ledger_trust(
    out: Annotated[Path, typer.Option("--out", "-o", help="The trust file to write.")],
) -> None:
    """Write the trust file auditors pin (operator command, on the control host): the
    checkpoint verifier key, the witnesses' keys (TOOLPLANE_WITNESS_KEYS) and the Ed25519
    public keys of control and the tools, from the key store (never from the database)."""
    from ledger.bundle_check import key_to_json

    plane = _plane()
    keys = [key_to_json(k) for k in plane.keystore.public_keys() if k.algorithm == "ed25519"]
    trust = {
        "format": TRUST_FORMAT,
        "checkpoint_keys": [plane.checkpoint_signer.verifier.vkey],
        "witness_keys": [k for k in plane.settings.witness_keys.split(",") if k],
        "keys": sorted(keys, key=lambda k: k["key_id"]),
    }
    _write(out, (json.dumps(trust, indent=2) + "\n").encode())
    console.print(f"{out}: checkpoint key and {len(keys)} public keys", markup=False)


@handled
def witness(
    home: Annotated[Path, typer.Option(help="The witness's own key and state.")],
    bind: Annotated[str, typer.Option(help="host:port to serve on.")] = "127.0.0.1:8766",
    name: Annotated[str, typer.Option(help="The witness's key name (made once).")] = "witness",
    log_key: Annotated[
        list[str] | None,
        typer.Option("--log-key", help="A log's checkpoint verifier key to pin; repeatable."),
    ] = None,
    loglevel: str = "INFO",
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="text or json (TOOLPLANE_LOG_FORMAT).")
    ] = None,
) -> None:
    """Run a witness: its own process, key and state. It cosigns a log's checkpoint only if
    it is consistent with the last one it cosigned for that origin (C2SP tlog-witness,
    POST /add-checkpoint), and refuses (and logs) anything else. Holds no database or
    broker URL; prints its verifier key (give it to the control as TOOLPLANE_WITNESS_KEYS)."""
    from control.cli.support import setup_logging
    from control.ops.witness_server import make_witness_server
    from ledger.note import NoteError, NoteVerifier
    from ledger.witness import load_witness

    setup_logging(loglevel, log_format)
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    known = logs.read_text().split() if logs.exists() else []
    for vkey in log_key or []:
        try:
            NoteVerifier.parse(vkey)
        except NoteError as e:
            raise UsageError(str(e), field="--log-key") from e
        if vkey not in known:
            known.append(vkey)
    logs.write_text("".join(v + "\n" for v in known))
    if not known:
        raise UsageError("pin at least one log's checkpoint key", field="--log-key")
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError("expected host:port", field="--bind")
    state = load_witness(home, name)
    server = make_witness_server(state, host, int(port))
    console.print(f"witness {state.signer.verifier.vkey} on http://{bind}", markup=False)
    try:
        server.serve_forever()
    finally:
        server.server_close()
