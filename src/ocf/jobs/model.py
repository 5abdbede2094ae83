"""Projects and stages: what a tracker hosts, validated once at the edge.

A project is an ordered list of 1..``max_stages`` stages. Stage ``i``'s jobs
take stage ``i-1``'s outputs as input; the last stage's outputs are the
project's results. Everything here is plain data with validation, no I/O, so
the HTTP layer, the CLI and the store share one definition of "valid".
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from ..errors import InvalidJobRequest

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,31}$")
#: distcompute-client addresses stages by letter.
STAGE_LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_FANOUT = 10_000


@attrs.frozen
class Stage:
    name: str
    lease_timeout: float
    #: When true, a list output becomes one next-stage job per element.
    fanout: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "lease_timeout": self.lease_timeout, "fanout": self.fanout}


@attrs.frozen
class Project:
    name: str
    stages: tuple[Stage, ...]
    max_attempts: int
    flag_threshold: int
    created: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stages": [s.to_json() for s in self.stages],
            "max_attempts": self.max_attempts,
            "flag_threshold": self.flag_threshold,
            "created": self.created,
        }

    def same_definition(self, other: Project) -> bool:
        return (self.stages, self.max_attempts, self.flag_threshold) == (
            other.stages,
            other.max_attempts,
            other.flag_threshold,
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Project:
        return cls(
            name=data["name"],
            stages=tuple(
                Stage(s["name"], float(s["lease_timeout"]), bool(s.get("fanout", False))) for s in data["stages"]
            ),
            max_attempts=int(data["max_attempts"]),
            flag_threshold=int(data["flag_threshold"]),
            created=float(data.get("created", 0.0)),
        )

    def stage_index(self, ref: Any) -> int:
        """A stage by name, by 1-based number, or by distcompute-client letter (``a``..``e``)."""
        if isinstance(ref, int) and not isinstance(ref, bool):
            if 1 <= ref <= len(self.stages):
                return ref - 1
        elif isinstance(ref, str):
            for i, stage in enumerate(self.stages):
                if stage.name == ref:
                    return i
            if ref.isdigit() and 1 <= int(ref) <= len(self.stages):
                return int(ref) - 1
            if len(ref) == 1 and ref.lower() in STAGE_LETTERS[: len(self.stages)]:
                return STAGE_LETTERS.index(ref.lower())
        names = ", ".join(f"{STAGE_LETTERS[i]}/{i + 1}/{s.name!r}" for i, s in enumerate(self.stages))
        raise InvalidJobRequest(f"project {self.name!r} has no stage {ref!r}; stages are {names}", code="unknown_stage")


def parse_project(
    name: str, body: Any, *, max_stages: int, default_lease: float, max_attempts: int, flag_threshold: int, now: float
) -> Project:
    """Validate a project definition from JSON; raise :class:`~ocf.errors.InvalidJobRequest` naming the bad field.

    ``{"stages": [{"name": "crawl", "lease_timeout": 600, "fanout": false}, ...],
    "max_attempts": 3, "flag_threshold": 5}``; a stage may also be just its name.
    """
    if not isinstance(name, str) or not PROJECT_NAME.match(name):
        raise InvalidJobRequest(
            f"project name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            code="bad_project_name",
        )
    if not isinstance(body, dict):
        raise InvalidJobRequest("project definition must be a JSON object with a 'stages' list", code="bad_project")
    unknown = set(body) - {"name", "stages", "max_attempts", "flag_threshold"}
    if unknown:
        raise InvalidJobRequest(f"unknown project field(s): {', '.join(sorted(unknown))}", code="bad_project")
    raw_stages = body.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise InvalidJobRequest("'stages' must be a non-empty list", code="bad_project")
    if len(raw_stages) > max_stages:
        raise InvalidJobRequest(
            f"a project may have at most {max_stages} stages, got {len(raw_stages)}", code="too_many_stages"
        )
    stages = []
    for i, raw in enumerate(raw_stages):
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict):
            raise InvalidJobRequest(f"stages[{i}] must be a name or an object", code="bad_project")
        extra = set(raw) - {"name", "lease_timeout", "fanout"}
        if extra:
            raise InvalidJobRequest(f"stages[{i}]: unknown field(s) {', '.join(sorted(extra))}", code="bad_project")
        stage_name = raw.get("name")
        if (
            not isinstance(stage_name, str)
            or not STAGE_NAME.match(stage_name)
            or stage_name.isdigit()
            or len(stage_name) == 1
        ):
            raise InvalidJobRequest(
                f"stages[{i}].name {stage_name!r} must be 2-32 letters, digits, spaces, '_', '.' or '-' and not a "
                "number",
                code="bad_project",
            )
        lease = raw.get("lease_timeout", default_lease)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease <= 7 * 86400:
            raise InvalidJobRequest(
                f"stages[{i}].lease_timeout must be seconds in (0, 604800], got {lease!r}", code="bad_project"
            )
        fanout = raw.get("fanout", False)
        if not isinstance(fanout, bool):
            raise InvalidJobRequest(f"stages[{i}].fanout must be true or false", code="bad_project")
        stages.append(Stage(stage_name, float(lease), fanout))
    if len({s.name for s in stages}) != len(stages):
        raise InvalidJobRequest("stage names must be distinct", code="bad_project")
    attempts = body.get("max_attempts", max_attempts)
    threshold = body.get("flag_threshold", flag_threshold)
    for field, value in (("max_attempts", attempts), ("flag_threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise InvalidJobRequest(f"{field} must be an integer in 1..1000, got {value!r}", code="bad_project")
    return Project(name, tuple(stages), attempts, threshold, now)
