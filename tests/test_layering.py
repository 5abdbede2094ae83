"""The package's layer rules, checked on the source: data and imports flow one way.

Every ``import`` in ``src/ocf`` counts, including those under ``TYPE_CHECKING``
and inside functions: a type-only import still ties two modules together
(that is how nine "hint only" imports of ``Node`` made one import cycle of
sixteen files). Subsystems talk through the Protocols of :mod:`ocf.ports`,
and only the composition root (:mod:`ocf.node`) and the CLI wire them up.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ocf"

#: Top-level parts of ocf, lowest layer first, each with the parts it may import (besides itself).
FOUNDATION = {"errors", "log", "version", "ports", "strictjson"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "strictjson": set(),  # JSON from clients and peers, refusing what Python takes but cannot encode
    "version": set(),
    "log": set(),
    "ports": {"errors", "identity", "transport"},
    "identity": {"errors", "log"},
    "store": {"errors", "log"},
    "directsocket": {"errors", "log"},
    "config": FOUNDATION | {"identity"},
    "transport": FOUNDATION | {"identity", "config", "directsocket"},
    "httpstream": FOUNDATION | {"directsocket"},
    "web": FOUNDATION | {"httpstream"},
    # Liveness (SWIM) over the host's streams; the node table takes liveness from it.
    "membership": FOUNDATION | {"identity", "config", "transport"},
    # Peer routing: serves and asks the DHT over the host's streams; knows no subsystem above it.
    "dht": FOUNDATION | {"identity", "config", "transport"},
    # The subsystems: none imports another; each gets what it needs from the node, typed by ocf.ports.
    "nodetable": FOUNDATION | {"identity", "config", "store", "transport", "web", "membership"},
    "services": FOUNDATION | {"identity", "config", "httpstream"},
    "jobs": FOUNDATION | {"identity", "config", "store", "httpstream", "web"},
    "gateway": FOUNDATION | {"identity", "config", "transport", "httpstream", "web", "directsocket"},
}
#: Known edges against the layering, each with the reason it is tolerated.
EXCEPTIONS = {
    # ``--network-key`` names a file; settings load it when they are read, with the pnet parser.
    ("ocf.config", "ocf.transport.pnet"),
    # Membership reuses the node table's JSON-lines frame reader and token bucket; both belong in a
    # leaf module below the two (left for a follow-up: moving them touches every node-table reader).
    ("ocf.membership.driver", "ocf.nodetable.wire"),
    ("ocf.membership.swim", "ocf.nodetable.heartbeat"),
}
#: The composition root and the programs that use it: they may import anything.
WIRING = {"node", "cli", "__main__", "ocf"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _exists(module: str) -> bool:
    base = SRC.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``ocf`` modules it imports (``from . import x`` resolved to the submodule)."""
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[module].update(alias.name for alias in node.names if alias.name.split(".")[0] == "ocf")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "ocf":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    graph[module].add(sub if _exists(sub) else target)
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ocf"


def test_every_part_is_classified():
    parts = {_part(m) for m in import_graph()}
    assert parts <= set(ALLOWED) | WIRING, f"new top-level parts need a layer: {parts - set(ALLOWED) - WIRING}"


def test_layers_import_only_downwards():
    wrong = []
    for module, targets in import_graph().items():
        part = _part(module)
        if part in WIRING:
            continue
        for target in sorted(targets):
            other = _part(target)
            if other != part and other not in ALLOWED[part] and (module, target) not in EXCEPTIONS:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_only_the_wiring_imports_the_node():
    importers = sorted(m for m, targets in import_graph().items() if "ocf.node" in targets and _part(m) not in WIRING)
    assert importers == []


def test_lower_layers_and_subsystems_stay_apart():
    """The rules the layering exists for, spelled out (the table above implies them)."""
    graph = import_graph()

    def imports(part: str, others: set[str]) -> list[str]:
        return sorted(f"{m} -> {t}" for m, ts in graph.items() if _part(m) == part for t in ts if _part(t) in others)

    above_transport = {"web", "gateway", "jobs", "nodetable", "services", "node", "cli"}
    for low in ("transport", "identity", "httpstream", "web"):
        assert imports(low, above_transport - {low}) == [], low
    assert imports("jobs", {"gateway"}) == []
    assert imports("nodetable", {"gateway"}) == []
    assert imports("gateway", {"jobs", "nodetable", "services"}) == []


def test_no_import_cycle_between_parts():
    graph = import_graph()
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for module, targets in graph.items():
        for target in targets:
            if _part(target) != _part(module) and (module, target) not in EXCEPTIONS:
                edges[_part(module)].add(_part(target))
    # Depth-first search for a back edge.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(part: str, path: list[str]) -> bool:
        state[part] = 1
        for nxt in sorted(edges[part]):
            if state.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt) :], nxt])
                return True
            if nxt not in state and visit(nxt, [*path, nxt]):
                return True
        state[part] = 2
        return False

    for part in sorted(edges):
        if part not in state and visit(part, [part]):
            break
    assert cycle == []
