"""The gateway's one router on hostile request targets: vectors and hypothesis.

Every spelling of a route other than the canonical one (one trailing slash
aside) must either be refused (400) or name no route at all: that is what
keeps ``/v1/p2p/<peer>//v1/dnt/_node`` and ``/v1/%5Fservice/...`` from
reaching something other than what they look like.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.errors import BadRequest
from ocf.gateway import router
from ocf.gateway.router import NonCanonicalTarget, Policy, classify

PEER = "12D3KooWLdHkhqC6Xyb3uRsWQmMRxVGcfF4VGu8u7j5wPu4t9SQL"


@pytest.mark.parametrize(
    "target",
    [
        f"/v1/p2p/{PEER}//v1/dnt/_node",
        "//v1/dnt/_node",
        "/v1//dnt/_node",
        "/v1/dnt//_node",
        "/v1/dnt/_node//",
        "/v1/./dnt/_node",
        "/v1/dnt/../dnt/_node",
        "/v1/dnt/%2e%2e/dnt/_node",
        "/v1/dnt/%2E/_node",
        "/v1/%5Fservice/jobs/",
        "/v1/%5fservice/jobs/x",
        "/v1/%73ervice/llm/v1/models",
        "/v1/service/%6Clm/v1/models",
        "/v1/_service/jobs%2Fx/",
        f"/v1/p2p/%31{PEER[1:]}/v1/health",
        "/v1/dnt/%5Fnode",
        "/v1\\dnt/_node",
        "/v1/service/llm\\..\\x",
        "/v1/jobs/a%2Fb",
        "/v1/jobs/p/jobs/..",
        "/dashboard/static/..%2Fdashboard.py",
        "v1/health",
    ],
)
def test_non_canonical_targets_are_400(target):
    for method in ("GET", "POST", "DELETE"):
        with pytest.raises(BadRequest) as info:
            classify(method, target.encode())
        assert info.value.status == 400


@pytest.mark.parametrize(
    "method, target, family, label, policy",
    [
        ("DELETE", "/v1/dnt/_node", router.NODETABLE, "/v1/dnt/_node", Policy.LOCAL_ADMIN),
        ("POST", "/v1/dnt/_node/", router.NODETABLE, "/v1/dnt/_node", Policy.LOCAL_ADMIN),
        ("GET", "/v1/dnt/table", router.NODETABLE, "/v1/dnt/table", Policy.PUBLIC),
        ("PUT", "/v1/jobs/crawl", router.JOBS, "/v1/jobs/<project>", Policy.LOCAL_ADMIN),
        ("POST", "/v1/jobs/crawl/jobs", router.JOBS, "/v1/jobs/<project>/jobs", Policy.LOCAL_ADMIN),
        ("POST", "/v1/jobs/crawl/workers", router.JOBS, "/v1/jobs/<project>/workers", Policy.WORKER),
        ("POST", "/v1/jobs/crawl/claim", router.JOBS_HOT, "/v1/jobs/<project>/claim", Policy.WORKER),
        ("GET", "/v1/jobs/crawl/api/new", router.JOBS_COMPAT, "/v1/jobs/<project>/api/new", Policy.WORKER),
        (
            "POST",
            "/v1/service/llm/v1/chat/completions",
            router.FORWARD_SERVICE,
            "/v1/service/<service>/<path>",
            Policy.API_KEY,
        ),
        (
            "POST",
            "/v1/_service/llm/v1/chat/completions",
            router.OWN_SERVICE,
            "/v1/_service/<service>/<path>",
            Policy.REMOTE_PEER,
        ),
        ("GET", f"/v1/p2p/{PEER}/v1/health", router.P2P, "/v1/p2p/<peer>/<path>", Policy.API_KEY),
        ("GET", "/v1/nothing", router.NOT_FOUND, "unmatched", Policy.PUBLIC),
        ("GET", "/v1/dnt/_node", router.METHOD_NOT_ALLOWED, "/v1/dnt/_node", Policy.PUBLIC),
    ],
)
def test_routes_carry_family_label_and_policy(method, target, family, label, policy):
    route = classify(method, target.encode())
    assert (route.family, route.label, route.policy) == (family, label, policy)


def test_forwarding_routes_keep_the_raw_rest():
    route = classify("GET", b"/v1/service/llm/v1/models/org%2Fmodel")
    assert route.service == "llm" and route.rest == b"v1/models/org%2Fmodel"
    route = classify("GET", f"/v1/p2p/{PEER}/v1/p2p/{PEER}/v1/health".encode())
    assert route.peer == PEER and route.rest == f"v1/p2p/{PEER}/v1/health".encode()
    route = classify("POST", b"/v1/_service/jobs")
    assert route.service == "jobs" and route.rest == b""


def test_quart_and_the_router_know_the_same_routes():
    """Every Quart rule is a router rule with the same label, so Quart cannot route what the router did not."""
    from quart_trio import QuartTrio

    from ocf.gateway.health import blueprint as health
    from ocf.gateway.metrics import blueprint as metrics
    from ocf.jobs.compat import blueprint as compat
    from ocf.jobs.dashboard import blueprint as dashboard
    from ocf.jobs.http import blueprint as jobs
    from ocf.nodetable.http import blueprint as nodetable

    app = QuartTrio("t")
    for bp in (health, metrics, compat, dashboard, jobs, nodetable):
        app.register_blueprint(bp)
    ours = {
        (r.method, r.label) for r in router.RULES if r.family != router.JOBS_HOT
    }  # hot routes are served below Quart
    theirs = {
        (m, rule.rule)
        for rule in app.url_map.iter_rules()
        for m in rule.methods - {"HEAD", "OPTIONS"}
        if not rule.rule.startswith("/static")
    }
    assert theirs == ours


_SEGMENTS = st.sampled_from(
    [
        "v1",
        "dnt",
        "_node",
        "service",
        "_service",
        "p2p",
        "jobs",
        "llm",
        PEER,
        "",
        ".",
        "..",
        "%2e",
        "%5F",
        "%5Fnode",
        "%2F",
        "a%20b",
        "\\",
        "x",
        "claim",
        "%73ervice",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(_SEGMENTS, min_size=0, max_size=8),
    st.booleans(),
    st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS"]),
)
def test_only_the_canonical_spelling_reaches_admin_routes(segments, trailing, method):
    target = ("/" + "/".join(segments) + ("/" if trailing else "")).encode()
    try:
        route = classify(method, target)
    except BadRequest:
        return
    assert route.label in set(router.labels())
    if route.policy is Policy.LOCAL_ADMIN:
        # The raw target is the template spelled plainly (parameters aside): no second spelling exists.
        assert target.rstrip(b"/") in (b"/v1/dnt/_node",) or target.startswith(b"/v1/jobs/")
        assert b"%5F" not in target and b"//" not in target and b"/./" not in target
    if route.family in router.FORWARDING:
        name = route.peer or route.service
        assert target.startswith(f"/v1/{target.split(b'/')[2].decode()}/{name}".encode())
        assert "%" not in name
    if route.path:
        # Quart gets the canonical path; routing it again gives the same route.
        again = classify(method, route.path.replace("%", "%25").replace(" ", "%20").encode())
        assert (again.family, again.label, again.policy, again.params) == (
            route.family,
            route.label,
            route.policy,
            route.params,
        )


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=0, max_size=80))
def test_any_bytes_either_route_or_400(raw):
    try:
        route = classify("GET", b"/" + raw)
    except NonCanonicalTarget:
        return
    except BadRequest as exc:
        assert exc.code in ("bad_service_name", "bad_peer_id")
        return
    assert route.label in set(router.labels())


def test_the_route_memory_stays_bounded():
    memory = router.Router(size=256)
    for i in range(5000):
        assert memory.classify("GET", f"/v1/jobs/p{i}/stats".encode()).label == "/v1/jobs/<project>/stats"
    assert len(memory._cache) <= 256
    assert memory.classify("GET", b"/v1/jobs/p1/stats") is memory.classify("GET", b"/v1/jobs/p1/stats")
