"""Sessions end when they should (token_version), and the abuse limits hold: proxy headers
only from trusted proxies, login and registration limits shared through Redis, invites."""

from __future__ import annotations

import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from backend.cli import proxy_options
from backend.main import create_app
from backend.rate_limit import RedisWindowLimiter, make_limiter
from backend.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"


def _token(env, username, password="password-123"):
    r = env.login(username, password)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _me(client, headers):
    return client.get("/api/v1/users/me", headers=headers).status_code


def _patch(client, env, uid, body):
    r = client.patch(f"/api/v1/users/{uid}", json=body, headers=env.admin_headers())
    assert r.status_code == 200, r.text


# -- sessions --------------------------------------------------------------------------------


def test_password_change_ends_old_sessions(env, client):
    uid, _ = env.user("ann")
    old = _token(env, "ann")
    assert _me(client, old) == 200
    _patch(client, env, uid, {"password": "new-password-456"})
    assert _me(client, old) == 401
    assert env.login("ann", "password-123").status_code == 401
    assert _me(client, _token(env, "ann", "new-password-456")) == 200


def test_role_change_ends_old_sessions_but_a_cap_change_does_not(env, client):
    uid, _ = env.user("ann")
    old = _token(env, "ann")
    _patch(client, env, uid, {"daily_cap": 5})
    assert _me(client, old) == 200
    _patch(client, env, uid, {"role": "annotator"})  # unchanged role: no effect
    assert _me(client, old) == 200
    _patch(client, env, uid, {"role": "admin"})
    assert _me(client, old) == 401
    new = _token(env, "ann")
    assert client.get("/api/v1/users", headers=new).status_code == 200


def test_ban_ends_sessions_for_good_even_after_unban(env, client):
    uid, _ = env.user("ann")
    old = _token(env, "ann")
    _patch(client, env, uid, {"status": "banned"})
    assert _me(client, old) == 403
    assert client.get("/api/v1/pairs/next", headers=old).status_code == 403
    _patch(client, env, uid, {"status": "active"})
    assert _me(client, old) == 401
    assert client.get("/api/v1/pairs/next", headers=old).status_code == 401
    assert _me(client, _token(env, "ann")) == 200


def test_logout_ends_every_session_of_the_user_hot_paths_included(env, client):
    env.pairs(2)
    env.user("ann")
    env.user("bob")
    a1, a2, bob = _token(env, "ann"), _token(env, "ann"), _token(env, "bob")
    pair = client.get("/api/v1/pairs/next", headers=a1).json()
    r = client.post("/api/v1/auth/logout", headers=a1)
    assert r.status_code == 204 and r.content == b""
    for h in (a1, a2):
        assert _me(client, h) == 401
        assert client.get("/api/v1/pairs/next", headers=h).status_code == 401
        vote = {"pair_id": pair["pair_id"], "choice": "left"}
        assert client.post("/api/v1/votes", json=vote, headers=h).status_code == 401
        assert client.post("/api/v1/votes", json={"bad": 1}, headers=h).status_code == 401
    assert env.count("votes") == 0
    assert _me(client, bob) == 200  # other users keep their sessions
    assert client.post("/api/v1/auth/logout").status_code == 401
    assert _me(client, _token(env, "ann")) == 200


# -- proxies ---------------------------------------------------------------------------------


def _settings(env, **kw) -> Settings:
    return env.state.settings.model_copy(update=kw)


def _proxied_client(env, settings: Settings, peer: str) -> TestClient:
    """The app behind uvicorn's own proxy-header middleware, configured as ``prefloop
    serve`` configures uvicorn, with requests arriving from ``peer``."""
    opts = proxy_options(settings)
    app = env.client.app
    if opts["proxy_headers"]:
        app = ProxyHeadersMiddleware(app, trusted_hosts=opts["forwarded_allow_ips"])
    return TestClient(app, client=(peer, 40000))


def _rotating_logins(c: TestClient, n: int) -> list[int]:
    return [
        c.post(
            "/api/v1/auth/token",
            data={"username": "ann", "password": "wrong-password"},
            headers={"X-Forwarded-For": f"203.0.113.{i}"},
        ).status_code
        for i in range(n)
    ]


def test_rotating_forwarded_for_from_loopback_does_not_evade_the_login_limit(env):
    env.user("ann")
    assert proxy_options(_settings(env)) == {"proxy_headers": False, "forwarded_allow_ips": []}
    codes = _rotating_logins(_proxied_client(env, _settings(env), "127.0.0.1"), 7)
    assert codes == [401] * 5 + [429] * 2


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(env):
    env.user("ann")
    trusted = _settings(env, trusted_proxies="10.0.0.0/8")
    assert proxy_options(trusted) == {"proxy_headers": True, "forwarded_allow_ips": ["10.0.0.0/8"]}
    # from the proxy: each forwarded client has its own budget
    assert _rotating_logins(_proxied_client(env, trusted, "10.1.2.3"), 7) == [401] * 7
    env.state.login_limiter.reset()
    # from anywhere else (loopback included) the header is ignored
    assert _rotating_logins(_proxied_client(env, trusted, "127.0.0.1"), 6)[-1] == 429


def test_trusted_proxies_setting_is_validated():
    with pytest.raises(ValidationError, match="not an IP address or network"):
        Settings(trusted_proxies="10.0.0.1, proxy.example")
    s = Settings(trusted_proxies=" 10.0.0.1 , fd00::/8 ")
    assert s.trusted_proxy_list == ["10.0.0.1", "fd00::/8"]


# -- registration ----------------------------------------------------------------------------


def _register(c, name, **extra):
    return c.post(
        "/api/v1/auth/register", json={"username": name, "password": "password-123", **extra}
    )


def test_registration_is_rate_limited_per_client_ip(env):
    a = TestClient(env.client.app, client=("198.51.100.1", 1))
    b = TestClient(env.client.app, client=("198.51.100.2", 1))
    limit = env.state.settings.register_rate_limit_attempts
    assert limit == 5
    codes = [_register(a, f"user{i}").status_code for i in range(limit + 1)]
    assert codes == [201] * limit + [429]
    r = _register(a, "another")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert _register(b, "fromb").status_code == 201
    assert env.count("users") == 1 + limit + 1


def test_invite_mode_needs_a_single_use_code(env, client):
    original = env.state.settings
    env.state.settings = _settings(env, signup_invites=True)
    try:
        assert _register(client, "noinvite").status_code == 403
        assert _register(client, "badcode", invite_code="nope").status_code == 403
        _, ann = env.user("ann")
        assert client.post("/api/v1/auth/invites", headers=ann).status_code == 403
        r = client.post("/api/v1/auth/invites", headers=env.admin_headers())
        assert r.status_code == 201, r.text
        code = r.json()["code"]
        assert len(code) >= 20
        r = _register(client, "invited", invite_code=code)
        assert r.status_code == 201, r.text
        uid = r.json()["id"]
        # the code is spent: a banned user cannot come back with it
        _patch(client, env, uid, {"status": "banned"})
        r = _register(client, "invited2", invite_code=code)
        assert r.status_code == 403 and "invite" in r.json()["detail"]
        assert env.count("users") == 3  # admin, ann, invited
        with env.state.db.read_session() as s:
            from sqlalchemy import text

            used_by, digest = s.execute(text("SELECT used_by, code_sha256 FROM invites")).one()
        assert used_by == uid and code not in digest
    finally:
        env.state.settings = original


# -- limits shared through Redis ---------------------------------------------------------------


@pytest.fixture
def redis_url():
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    return REDIS_URL


def test_redis_limiter_is_one_budget_for_several_processes(redis_url):
    name = f"test-{uuid.uuid4().hex}"
    a = make_limiter(redis_url, 3, 60, name=name)
    b = make_limiter(redis_url, 3, 60, name=name)
    assert isinstance(a, RedisWindowLimiter)
    try:
        assert [a.hit("k"), b.hit("k"), a.hit("k")] == [0, 0, 0]
        waits = [b.hit("k"), a.hit("k")]
        assert all(1 <= w <= 60 for w in waits)
        assert a.hit("other") == 0  # keys are separate
        b.reset()
        assert a.hit("k") == 0
    finally:
        a.reset()


def test_redis_limiter_counts_in_process_while_redis_is_down():
    limiter = make_limiter("redis://127.0.0.1:1/0", 2, 60, name="down")
    assert [limiter.hit("k"), limiter.hit("k")] == [0, 0]
    assert limiter.hit("k") >= 1


def test_two_api_processes_share_the_login_limit_through_redis(env, redis_url):
    env.user("ann")
    settings = _settings(env, rate_limit_redis_url=redis_url)
    apps = [create_app(settings, env.dispatcher) for _ in range(2)]
    try:
        for app in apps:
            app.state.prefloop.login_limiter.reset()
        clients = [TestClient(app, client=("192.0.2.7", 1)) for app in apps]
        codes = [
            clients[i % 2]
            .post("/api/v1/auth/token", data={"username": "ann", "password": "wrong-pass"})
            .status_code
            for i in range(7)
        ]
        assert codes == [401] * 5 + [429] * 2
    finally:
        for app in apps:
            app.state.prefloop.login_limiter.reset()
            app.state.prefloop.db.dispose()
