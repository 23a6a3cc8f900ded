"""C2SP signed notes and tlog-checkpoints: published vectors, forms refused.

Vectors: golang.org/x/mod/sumdb/note's example (PeterNeumann, EnochRoot) and the
example of the C2SP signed-note specification (example.com/foo).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.checkpoint import Checkpoint, chain_of_origin, origin_for
from ledger.merkle import EMPTY_ROOT
from ledger.note import NoteError, NoteSigner, NoteVerifier, open_note, sign_note, split_note

PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"  # noqa: E501
ENOCH_SIG = "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"  # noqa: E501
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = "This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"  # noqa: E501


def test_go_vector_signs_and_verifies() -> None:
    signer = NoteSigner.parse(PETER_SKEY)
    assert signer.verifier.vkey == PETER_VKEY
    assert signer.skey == PETER_SKEY
    assert sign_note(TEXT, [signer]) == TEXT + "\n" + PETER_SIG
    text, sigs = open_note((TEXT + "\n" + PETER_SIG).encode(), [NoteVerifier.parse(PETER_VKEY)])
    assert text == TEXT and sigs[0].key_id.hex() == "c74f20a3"


def test_two_signatures_and_an_unknown_one() -> None:
    note = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    _, sigs = open_note(note, [NoteVerifier.parse(ENOCH_VKEY)])
    assert [s.name for s in sigs] == ["EnochRoot"]
    with pytest.raises(NoteError, match="no trusted key"):
        open_note((TEXT + "\n" + ENOCH_SIG).encode(), [NoteVerifier.parse(PETER_VKEY)])


def test_spec_vector_verifies() -> None:
    text, _ = open_note(SPEC_NOTE.encode(), [NoteVerifier.parse(SPEC_VKEY)])
    assert text == "This is an example message.\n"


def test_any_flipped_byte_fails() -> None:
    note = (TEXT + "\n" + PETER_SIG).encode()
    verifier = NoteVerifier.parse(PETER_VKEY)
    for i in range(len(note)):
        bad = bytearray(note)
        bad[i] ^= 0x01
        with pytest.raises(NoteError):
            open_note(bytes(bad), [verifier])


@pytest.mark.parametrize(
    "vkey",
    [
        PETER_VKEY.replace("c74f20a3", "c74f20a4"),
        PETER_VKEY + "A",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3",
        PETER_VKEY.replace("+AR", "+Ah"),
    ],
)
def test_bad_verifier_keys(vkey: str) -> None:
    with pytest.raises(NoteError):
        NoteVerifier.parse(vkey)


def test_forms_refused() -> None:
    for note in [b"no blank line\n", TEXT.encode() + b"\n", b"\xff\n\n" + PETER_SIG.encode()]:
        with pytest.raises(NoteError):
            split_note(note)


def test_checkpoint_round_trip() -> None:
    cp = Checkpoint(origin_for("acme.example/toolplane", "tenant:tn_1"), 42, EMPTY_ROOT)
    assert cp.text() == (
        "acme.example/toolplane/tenant/tn_1\n42\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    )
    assert Checkpoint.parse(cp.text()) == cp
    assert chain_of_origin("acme.example/toolplane", cp.origin) == "tenant:tn_1"
    assert origin_for("d", "system") == "d/system"
    for bad in ["o\n042\nAAAA\n", "o\n1\n", "o\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV=\n"]:
        with pytest.raises(NoteError):
            Checkpoint.parse(bad)
    with pytest.raises(NoteError):
        origin_for("bad name", "system")


def test_the_checkpoint_key_is_made_once(tmp_path: Path) -> None:
    """Processes that start together (control, API processes) end up with one key."""
    from concurrent.futures import ThreadPoolExecutor

    from ledger.checkpoints import load_signer

    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_signer(tmp_path, "d.example").skey, range(16)))
    assert len(set(keys)) == 1
    assert (tmp_path / "checkpoint.vkey").read_text().strip() == NoteSigner.parse(
        keys[0]
    ).verifier.vkey
    assert oct((tmp_path / "checkpoint.skey").stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.skey", "checkpoint.vkey"]
    with pytest.raises(Exception, match="named 'd.example'"):
        load_signer(tmp_path, "other.example")
