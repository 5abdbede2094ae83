"""``/v1/dnt/*``: the node table over HTTP, in OCF's shapes.

``POST``/``DELETE /v1/dnt/_node`` change this node's own entry: the gateway's
router gives them the local-admin policy (admin token, never a remote peer),
so no check is repeated here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from quart import Blueprint, current_app, jsonify, request

from .. import strictjson
from ..errors import ValidationError
from ..ports import HttpMount, NatView, PeerDialer
from ..web.errors import error_response
from .metrics import NodeTableCollector

if TYPE_CHECKING:
    from .table import NodeTable

blueprint = Blueprint("nodetable", __name__)
TABLE_EXTENSION, PEERS_EXTENSION, NAT_EXTENSION = "ocf.nodetable", "ocf.peers", "ocf.nat"


def nodetable_mount(table: NodeTable, peers: PeerDialer, nat: NatView | None = None) -> HttpMount:
    """``/v1/dnt/*`` and the table's ``/metrics`` families, for the node to mount on its gateway."""
    return HttpMount(
        blueprints=(blueprint,),
        extensions={TABLE_EXTENSION: table, PEERS_EXTENSION: peers, NAT_EXTENSION: nat},
        collectors=(NodeTableCollector(table),),
    )


def _table() -> NodeTable:
    table: NodeTable = current_app.extensions[TABLE_EXTENSION]
    return table


@blueprint.get("/v1/dnt/table")
async def table():  # type: ignore[no-untyped-def]
    include_all = request.args.get("all", "").lower() in ("1", "true", "yes")
    return jsonify({f"/{peer}": entry for peer, entry in _table().entries(include_all).items()})


@blueprint.get("/v1/dnt/peers")
async def peers():  # type: ignore[no-untyped-def]
    host: PeerDialer = current_app.extensions[PEERS_EXTENSION]
    nat: NatView | None = current_app.extensions[NAT_EXTENSION]
    out = [
        {
            "ID": str(p),
            "Addrs": [str(a) for a in host.peer_addrs(p)],
            # only through a circuit relay (limited in time and bytes) until hole punching upgrades it
            "Relayed": nat.relayed(p) if nat is not None else False,
        }
        for p in host.connected_peers()
    ]
    return jsonify(peers=out)


@blueprint.get("/v1/dnt/peers_status")
async def peers_status():  # type: ignore[no-untyped-def]
    entries = _table().entries(include_all=True)
    nat: NatView | None = current_app.extensions[NAT_EXTENSION]
    return jsonify(
        nat=nat.status() if nat is not None else {"reachability": "unknown"},
        peers=[
            {"id": peer, "status": e.get("status"), "connected": e["connected"], "last_seen": e["last_seen"]}
            for peer, e in entries.items()
        ],
    )


@blueprint.get("/v1/dnt/bootstraps")
async def bootstraps():  # type: ignore[no-untyped-def]
    out = []
    for entry in _table().entries(include_all=False).values():
        if not entry.get("public_address"):
            continue
        for addr in entry.get("addrs") or []:
            if entry["public_address"] in addr:
                out.append(addr)
    return jsonify(bootstraps=out)


@blueprint.get("/v1/dnt/stats")
async def stats():  # type: ignore[no-untyped-def]
    return jsonify(_table().summary_stats())


def _max_entry_json() -> int:
    """Largest update body, and largest entry (as JSON) an update may leave.

    A quarter of the entry cap peers enforce (``--max-entry-size``), so the history
    kept until the next compaction still fits the record caps and peers keep
    accepting our later updates.
    """
    return int(_table().config.nodetable_max_entry_bytes) // 4


@blueprint.post("/v1/dnt/_node")
async def update_node():  # type: ignore[no-untyped-def]
    MAX_ENTRY_JSON = _max_entry_json()
    too_large = error_response(413, f"a node entry may be at most {MAX_ENTRY_JSON} bytes of JSON", "entry_too_large")
    if (request.content_length or 0) > MAX_ENTRY_JSON:
        return too_large
    body = await request.get_data()
    if len(body) > MAX_ENTRY_JSON:
        return too_large
    try:
        fields = strictjson.loads(body or b"null")
    except ValueError as exc:
        return error_response(400, f"body is not valid JSON: {exc}", "invalid_json")
    table = _table()
    if isinstance(fields, dict):
        # Refused before writing: an entry over the record cap would make every peer reject our later updates.
        merged = {**table.own_entry(), **fields}
        if len(json.dumps(merged, default=str).encode()) > MAX_ENTRY_JSON:
            return too_large
    try:
        entry = await table.update_own(fields)
    except ValidationError as exc:
        return error_response(400, str(exc), "invalid_node_fields")
    return jsonify(entry)


@blueprint.delete("/v1/dnt/_node")
async def delete_node():  # type: ignore[no-untyped-def]
    await _table().set_services([])
    return jsonify(_table().own_entry())
