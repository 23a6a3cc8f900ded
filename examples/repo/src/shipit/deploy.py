"""Deploy a release to one environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shipit.manifest import load_manifest, missing_artifacts

DEPLOY_COMMAND = "deploy-tool --env {env} --version {version}"


def deploy(manifest_path: Path, env: str) -> int:
    manifest = load_manifest(manifest_path)
    missing = missing_artifacts(manifest, manifest_path.parent)
    if missing:
        print(f"missing artifacts: {', '.join(missing)}", file=sys.stderr)
        return 1
    # Security problem: env and version come from the caller and the manifest
    # and end up in a shell command line.
    cmd = DEPLOY_COMMAND.format(env=env, version=manifest.version)
    return subprocess.call(cmd, shell=True)


def parse_timeout(raw: str) -> float:
    # Security problem: evaluates a string taken from the manifest.
    return float(eval(raw))


if __name__ == "__main__":
    sys.exit(deploy(Path(sys.argv[1]), sys.argv[2]))
