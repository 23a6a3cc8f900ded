"""Data labels: the classification an operator puts on the data that calls read.

``labels.json`` in a bundle (optional; part of the bundle's version, so a change
is a new version, recorded like any other):

    {"rules": [
      {"tool": "read_repo_file", "arg": "path", "glob": "secrets/*",
       "classification": "restricted"},
      {"tool": "search_docs", "classification": "confidential"},
      {"tool": "*", "root": "hr_records", "classification": "restricted"}
    ]}

A rule without ``arg`` labels everything the tool reads (its data roots); with
``root`` it applies only to tools that declare that named data root (``repo``,
``docs``, or a plugin's own, as its manifest says: ``data_roots``); with
``arg`` and ``glob`` it labels the calls whose string argument matches the glob
(``fnmatch``, case-sensitive, on the argument as given and on the path it names
once ``.``, ``..`` and empty segments are resolved: either matching labels it).
Labels only raise a call's classification: the call is decided at the strictest
of what the run says and every rule that matches, in the deployment's order of
classifications.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policy.errors import BundleError
from toolplane.errors import first_problem

FILE = "labels.json"

__all__ = ["DataLabels", "load_labels", "roots_of"]


class _Rule(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    tool: str = Field(min_length=1, max_length=63)
    root: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,31}$")
    arg: str | None = Field(default=None, min_length=1, max_length=100)
    glob: str | None = Field(default=None, min_length=1, max_length=500)
    classification: str = Field(min_length=1, max_length=40)

    @model_validator(mode="after")
    def _arg_and_glob(self) -> _Rule:
        if (self.arg is None) != (self.glob is None):
            raise ValueError("arg and glob go together (or neither, for the whole tool)")
        return self


class _File(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    rules: list[_Rule] = Field(default_factory=list, max_length=1000)


@dataclass(frozen=True)
class DataLabels:
    rules: tuple[_Rule, ...] = ()

    def classify(
        self,
        tool: str,
        args: dict[str, Any],
        floor: str,
        order: tuple[str, ...],
        *,
        roots: tuple[str, ...] = (),
    ) -> str:
        """The strictest of ``floor`` and every label that matches this call; ``roots``:
        the data roots the tool declares."""
        rank = {name: i for i, name in enumerate(order)}
        strictest = floor
        for rule in self.rules:
            if rule.tool not in (tool, "*"):
                continue
            if rule.root is not None and rule.root not in roots:
                continue
            if rule.arg is not None:
                value = args.get(rule.arg)
                if not isinstance(value, str) or not any(
                    fnmatchcase(spelling, str(rule.glob)) for spelling in _spellings(value)
                ):
                    continue
            # a label the order does not know is the strictest there is: never laxer
            if rank.get(rule.classification, len(order)) > rank.get(strictest, -1):
                strictest = rule.classification
        return strictest

    def as_dict(self) -> dict[str, Any]:
        return {"rules": [r.model_dump(exclude_none=True) for r in self.rules]}


def roots_of(manifest: dict[str, Any] | None) -> tuple[str, ...]:
    """The data roots a tool's manifest declares (none if unknown)."""
    found = (manifest or {}).get("data_roots")
    return tuple(r for r in found if isinstance(r, str)) if isinstance(found, list) else ()


def _spellings(value: str) -> tuple[str, ...]:
    """The argument as given, and as the path it names: ``./config/x``, ``config//x`` and
    ``src/../config/x`` all name ``config/x``, which a tool resolving the path reads.
    Matching both can only raise a classification (a bundle without plain-paths-only
    would otherwise decide ``./config/x`` below ``config/*``'s label)."""
    plain = posixpath.normpath(value).lstrip("/") if value else value
    return (value,) if plain == value else (value, plain)


def load_labels(bundle: Path) -> DataLabels:
    path = bundle / FILE
    if not path.exists():
        return DataLabels()
    try:
        parsed = _File.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        if isinstance(e, ValidationError):
            where, rule = first_problem(e, where="labels")
            raise BundleError(f"{FILE}: {where}: {rule}", path=path) from e
        raise BundleError(f"{FILE}: {e}", path=path) from e
    return DataLabels(tuple(parsed.rules))
