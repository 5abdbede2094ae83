"""setup.cfg states ranges, constraints.txt pins them: the two must agree.

A dependency added to setup.cfg without a pin would let CI drift to whatever
is newest; a pin outside its range would make tox's install fail. Both are
caught here, before tox runs, without touching a registry.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["test"].splitlines()
    return [Requirement(line) for line in (x.strip() for x in lines) if line and not line.startswith("#")]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt holds exact pins only: {line!r}"
        assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_pinned_inside_its_range():
    reqs, pins = _requirements(), _pins()
    assert len(reqs) >= 20
    outside = [
        f"{r} (pinned {pins.get(canonicalize_name(r.name))})"
        for r in reqs
        if pins.get(canonicalize_name(r.name)) not in r.specifier
    ]
    assert outside == []


def test_library_states_ranges_except_automerge():
    exact = sorted(r.name for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier))
    assert exact == ["automerge"]
    automerge = next(r for r in _requirements() if r.name == "automerge")
    assert str(automerge.specifier) == "==0.2.0.dev4"
    unbounded = [
        str(r) for r in _requirements() if r.name != "automerge" and not any(s.operator == "<" for s in r.specifier)
    ]
    assert unbounded == []


def test_tox_installs_with_the_constraints():
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    assert "PIP_CONSTRAINT = {toxinidir}/constraints.txt" in tox["testenv"]["setenv"]
