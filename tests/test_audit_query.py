"""GET /audit: filters by patient, actor, action and time, keyset pages with ``before``, bounds."""

from __future__ import annotations

import httpx

from tests.conftest import RunningServer, login_token


async def test_audit_filters_and_pages(server: RunningServer) -> None:
    admin = await login_token(server, "admin")
    await login_token(server, "clinician")
    await login_token(server, "viewer")
    await server.services.writer.flush()
    h = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=server.url, headers=h) as http:
        everything = (await http.get("/audit", params={"limit": 1000})).json()
        assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)
        logins = (await http.get("/audit", params={"action": "login", "limit": 1000})).json()
        assert logins and all(r["action"] == "login" for r in logins)
        assert {r["actor"] for r in logins} >= {"admin", "clinician", "viewer"}
        mine = (await http.get("/audit", params={"actor": "viewer", "limit": 1000})).json()
        assert mine and all(r["actor"] == "viewer" for r in mine)
        # time: since <= at < until
        at = sorted(r["at"] for r in everything)
        mid = at[len(at) // 2]
        later = (await http.get("/audit", params={"since": mid, "limit": 1000})).json()
        assert later and all(r["at"] >= mid for r in later)
        earlier = (await http.get("/audit", params={"until": mid, "limit": 1000})).json()
        assert all(r["at"] < mid for r in earlier)
        assert len(later) + len(earlier) >= len(everything)  # read_audit rows come in between
        # pages of 2 walked with before = the last id: the same rows as one read, once each
        walked: list[int] = []
        before = None
        while True:
            params = {"limit": 2, "action": "login"}
            if before is not None:
                params["before"] = before
            page = (await http.get("/audit", params=params)).json()
            if not page:
                break
            walked += [r["id"] for r in page]
            before = page[-1]["id"]
        assert walked == [r["id"] for r in logins]
        # bounds name their field
        for params, field in (
            ({"since": 10, "until": 5}, "since"),
            ({"since": "nan"}, "since"),
            ({"before": 0}, "before"),
            ({"actor": "x" * 65}, "actor"),
        ):
            r = await http.get("/audit", params=params)
            assert r.status_code == 422 and r.json()["field"] == field, (params, r.text)
    clinician = await login_token(server, "clinician")
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/audit", headers={"Authorization": f"Bearer {clinician}"})
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
