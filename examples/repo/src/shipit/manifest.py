"""Release manifests: which artifacts a release ships, and where."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ENVIRONMENTS = ("staging", "production")


class ManifestError(ValueError):
    """A manifest that cannot be used, naming the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Manifest:
    version: str
    artifacts: tuple[str, ...]
    environments: tuple[str, ...]


def load_manifest(path: Path) -> Manifest:
    """Read and validate the manifest at ``path``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ManifestError("$", "must be a JSON object")
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise ManifestError("version", "must be a non-empty string")
    artifacts = data.get("artifacts", [])
    if not isinstance(artifacts, list) or not all(isinstance(a, str) for a in artifacts):
        raise ManifestError("artifacts", "must be a list of paths")
    environments = data.get("environments", list(ENVIRONMENTS))
    unknown = sorted(set(environments) - set(ENVIRONMENTS))
    if unknown:
        raise ManifestError("environments", f"unknown environments {unknown}")
    return Manifest(version, tuple(artifacts), tuple(environments))


def missing_artifacts(manifest: Manifest, root: Path) -> list[str]:
    """The artifacts of ``manifest`` that do not exist under ``root``."""
    return [name for name in manifest.artifacts if not (root / name).is_file()]
