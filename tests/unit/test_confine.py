"""The kernel layers of a tool's process, each on its own and all together.

Each test forks a stand-in for the runner (P), which forks the tool's process (C); C
applies the layers, then tries what an exploited tool would try against P and the
host, and reports the errno of each attempt. Every probe is also run unconfined, so a
test shows the layer made the difference (this suite runs as root here: without the
layers nearly everything succeeds).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox_tasks.confine import (
    Confinement,
    available,
    confine,
    containment,
    landlock,
    missing,
    seccomp,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="x86_64 Linux numbers"
)
ABI = min(landlock.abi(), landlock.MAX_ABI)
needs_landlock = pytest.mark.skipif(ABI == 0, reason="this kernel has no Landlock")
needs_seccomp = pytest.mark.skipif(seccomp.available() is not None, reason="no libseccomp")
SYS = {"process_vm_readv": 310, "keyctl": 250, "bpf": 321, "clone3": 435, "clone": 56}
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SECRET = b"the runner's memory " * 4


def code(fn: Callable[[], Any]) -> str:
    """What an attempt came to: "ok" or the errno's name."""
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def raw(number: int, *args: Any) -> None:
    """syscall(2) with whole registers (a bare int would leave the upper half undefined)."""
    args = tuple(ctypes.c_long(a) if isinstance(a, int) else a for a in args)
    ctypes.set_errno(0)
    if libc.syscall(ctypes.c_long(number), *args) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def call(fn: Any, *args: Any) -> None:
    ctypes.set_errno(0)
    if fn(*args) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def attempts(scratch: Path, outside: Path, secret_address: int) -> dict[str, str]:
    parent = os.getppid()
    local = ctypes.create_string_buffer(16)
    iov_local = (ctypes.c_void_p * 2)(ctypes.addressof(local), 16)
    iov_remote = (ctypes.c_void_p * 2)(secret_address, 16)
    tried = {
        "read_outside": lambda: outside.read_bytes(),
        "write_outside": lambda: (outside.parent / "planted").write_text("x"),
        "read_system": lambda: Path("/usr/bin/env").read_bytes(),
        "write_scratch": lambda: (scratch / "note").write_text("x"),
        "exec_system": lambda: os.waitpid(os.spawnv(os.P_NOWAIT, "/bin/true", ["true"]), 0),  # noqa: S606
        "parent_environ": lambda: Path(f"/proc/{parent}/environ").read_bytes(),
        "parent_mem": lambda: open(f"/proc/{parent}/mem", "rb").close(),
        "parent_fd": lambda: os.listdir(f"/proc/{parent}/fd"),
        "process_vm_readv": lambda: raw(
            SYS["process_vm_readv"], parent, iov_local, 1, iov_remote, 1, 0
        ),  # fmt: skip
        "ptrace_attach": lambda: call(libc.ptrace, 16, parent, None, None),
        "sigstop_parent": lambda: os.kill(parent, signal.SIGSTOP),
        "tcp_connect": lambda: socket.create_connection(("127.0.0.1", 9), timeout=1),
        "socket_inet": lambda: socket.socket(socket.AF_INET).close(),
        "socket_unix": lambda: socket.socket(socket.AF_UNIX).close(),
        "socketpair_unix": lambda: [s.close() for s in socket.socketpair()],
        # a target that does not exist: unconfined (as root) this is ENOENT, never a mount
        "mount": lambda: call(libc.mount, b"none", b"/nonexistent-tp", b"tmpfs", 0, None),
        "unshare_user": lambda: call(libc.unshare, 0x10000000),
        "clone_newuser": lambda: raw(SYS["clone"], 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0),
        "clone3": lambda: raw(SYS["clone3"], None, 0),
        "keyctl": lambda: raw(SYS["keyctl"], 0, 0),
        "bpf": lambda: raw(SYS["bpf"], 0, 0, 0),
        "personality_no_aslr": lambda: call(libc.personality, 0x0040000),
        "personality_query": lambda: call(libc.personality, 0xFFFFFFFF),
        "thread": lambda: __import__("threading").Thread(target=int).start(),
        "fork": lambda: os.waitpid(os.fork() or os._exit(0), 0),  # type: ignore[func-returns-value]
    }
    return {name: code(fn) for name, fn in tried.items()}


def in_child(
    c: Confinement | None, tmp_path: Path, prepare: Callable[[], None] | None = None
) -> dict[str, Any]:
    """P forks C; C confines itself with ``c`` and reports its attempts against P.
    ``prepare`` runs in P before it forks (as the runner prepares before serving)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    outside = tmp_path / "outside" / "key.pem"
    outside.parent.mkdir(exist_ok=True)
    outside.write_text("a private key")
    secret = ctypes.create_string_buffer(SECRET)
    read_fd, write_fd = os.pipe()
    parent = os.fork()
    if parent == 0:  # P: the runner's stand-in
        os.close(read_fd)
        if prepare is not None:
            prepare()
        child = os.fork()
        if child == 0:  # C: the tool's process
            report: dict[str, Any] = {}
            try:
                report["precompiled"] = (seccomp._compiled or (0, b""))[0] == os.getppid()
                if c is not None:
                    report["applied"] = list(confine(c))
                report.update(attempts(scratch, outside, ctypes.addressof(secret)))
            except BaseException as e:  # noqa: BLE001
                report["error"] = repr(e)
            os.write(write_fd, json.dumps(report).encode())
            os._exit(0)
        os.close(write_fd)
        os.waitpid(child, 0)
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    deadline = time.monotonic() + 10
    while os.waitpid(parent, os.WNOHANG) == (0, 0):
        os.kill(parent, signal.SIGCONT)  # if a probe stopped P
        assert time.monotonic() < deadline, "P did not finish"
        time.sleep(0.01)
    report = json.loads(data)
    assert "error" not in report, report["error"]
    return report


def trees(tmp_path: Path) -> dict[str, Any]:
    return {
        "read_only": tuple(
            Path(p)
            for p in ("/usr", "/lib", "/lib64", "/bin", sys.prefix, sys.base_prefix)
            if Path(p).exists()
        ),  # fmt: skip
        "read_write": (tmp_path / "scratch",),
    }


def test_unconfined_every_attempt_succeeds(tmp_path: Path) -> None:
    """The probes can tell: without the layers, the host lets them all through."""
    if os.geteuid() != 0:
        pytest.skip("as another user, DAC already refuses part of it")
    seen = in_child(None, tmp_path)
    for name in ("read_outside", "write_outside", "parent_environ", "parent_mem", "parent_fd"):
        assert seen[name] == "ok", (name, seen)
    for name in ("process_vm_readv", "socket_inet", "socket_unix", "unshare_user"):
        assert seen[name] == "ok", (name, seen)
    assert seen["mount"] == "ENOENT"  # the kernel looked at the target: mount was allowed
    assert seen["clone3"] == "EINVAL"  # the kernel's own answer to a size of 0


@needs_landlock
def test_landlock_alone(tmp_path: Path) -> None:
    seen = in_child(Confinement(**trees(tmp_path), layers=(f"landlock{ABI}",)), tmp_path)
    assert seen["applied"] == [f"landlock{ABI}"]
    assert seen["read_system"] == seen["write_scratch"] == seen["exec_system"] == "ok"
    for name in ("read_outside", "write_outside", "parent_environ", "parent_mem", "parent_fd"):
        assert seen[name] == "EACCES", (name, seen)
    assert seen["ptrace_attach"] == seen["process_vm_readv"] == "EPERM"  # outside the domain
    if ABI >= 4:
        assert seen["tcp_connect"] == "EACCES"
    if ABI >= 6:
        assert seen["sigstop_parent"] == "EPERM"


@needs_landlock
@pytest.mark.parametrize("version", range(1, landlock.MAX_ABI + 1))
def test_every_abi_version_restricts_what_it_knows(tmp_path: Path, version: int) -> None:
    if version > ABI:
        pytest.skip(f"the kernel has ABI {ABI}")
    seen = in_child(Confinement(**trees(tmp_path), layers=(f"landlock{version}",)), tmp_path)
    assert seen["applied"] == [f"landlock{version}"]
    assert seen["read_outside"] == seen["write_outside"] == "EACCES"
    assert seen["write_scratch"] == seen["read_system"] == "ok"
    # network rights from ABI 4, scopes from 6: below that, the rights stay unhandled
    assert (seen["tcp_connect"] == "EACCES") == (version >= 4), seen["tcp_connect"]
    assert (seen["sigstop_parent"] == "EPERM") == (version >= 6), seen["sigstop_parent"]


@needs_seccomp
def test_seccomp_alone(tmp_path: Path) -> None:
    seen = in_child(Confinement(layers=("seccomp",)), tmp_path)
    assert seen["applied"] == ["seccomp"]  # no_new_privs is set for it, not named
    for name in (
        "socket_inet",
        "socket_unix",
        "tcp_connect",
        "ptrace_attach",
        "process_vm_readv",
        "mount",
        "unshare_user",
        "clone_newuser",
        "keyctl",
        "bpf",
        "personality_no_aslr",
        "sigstop_parent",
    ):
        assert seen[name] == "EPERM", (name, seen)
    assert seen["clone3"] == "ENOSYS"  # so that libc falls back to clone
    for name in ("socketpair_unix", "personality_query", "thread", "fork", "exec_system"):
        assert seen[name] == "ok", (name, seen)


@needs_seccomp
def test_a_filter_compiled_once_by_the_parent_refuses_the_same(tmp_path: Path) -> None:
    """The runner builds the filter once (compile_for_children); each call's process loads
    that program: the same refusals as a filter it builds itself, the parent's pid in it."""
    seen = in_child(Confinement(layers=("seccomp",)), tmp_path, seccomp.compile_for_children)
    assert seen["precompiled"] is True and seen["applied"] == ["seccomp"]
    alone = in_child(Confinement(layers=("seccomp",)), tmp_path)
    assert alone["precompiled"] is False
    del seen["precompiled"], alone["precompiled"]
    assert seen == alone
    assert seen["sigstop_parent"] == seen["socket_inet"] == seen["ptrace_attach"] == "EPERM"


@needs_landlock
@needs_seccomp
def test_all_layers(tmp_path: Path) -> None:
    c = Confinement(**trees(tmp_path), layers=tuple(n for n in available() if n != "rlimits"))
    seen = in_child(c, tmp_path)
    assert set(seen["applied"]) == {"no_new_privs", f"landlock{ABI}", "seccomp"}
    refused = {k for k, v in seen.items() if v not in ("ok", seen["applied"])}
    assert refused >= {"read_outside", "write_outside", "parent_environ", "parent_mem",
                       "parent_fd", "process_vm_readv", "ptrace_attach", "sigstop_parent",
                       "tcp_connect", "socket_inet", "socket_unix", "mount", "unshare_user",
                       "clone_newuser", "keyctl", "bpf", "clone3"}  # fmt: skip
    assert {k for k, v in seen.items() if v == "ok"} >= {"read_system", "write_scratch", "fork"}


def test_a_layer_that_cannot_be_applied_raises(tmp_path: Path) -> None:
    from sandbox_tasks.confine import ConfinementError

    with pytest.raises(ConfinementError, match="no such layer"):
        confine(Confinement(layers=("apparmor",)))
    # an ABI the module does not know: refused before anything is applied
    seen: dict[str, Any] = {}
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            confine(Confinement(layers=("landlock9",)))
            os.write(write_fd, b"applied")
        except ConfinementError as e:
            os.write(write_fd, f"{e.layer}|{e}".encode())
        os._exit(0)
    os.close(write_fd)
    seen["message"] = os.read(read_fd, 4096).decode()
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert seen["message"].startswith("landlock9|landlock9: "), seen


def test_naming_and_floors() -> None:
    assert containment("bwrap", ["rlimits", "no_new_privs", "seccomp", "landlock7"]) == (
        "bwrap+landlock7+seccomp+nnp+rlimits"
    )
    assert containment("fork", ["rlimits"]) == "fork+rlimits"
    have = ("no_new_privs", "landlock5", "seccomp", "rlimits")
    assert missing(["landlock", "landlock5", "seccomp"], have) == []
    assert missing(["landlock6", "no_new_privs"], have) == ["landlock6"]
    assert missing(["landlock", "seccomp"], ("no_new_privs", "rlimits")) == ["landlock", "seccomp"]
    assert available()[0] == "no_new_privs" and available()[-1] == "rlimits"
