"""Authentication and authorisation: 401, 403, bans, sign-up, user admin, rate limiting."""

from __future__ import annotations

import jwt
import pytest

from backend.models import UserRole

ADMIN_ONLY = [
    ("get", "/api/v1/users"),
    ("post", "/api/v1/users"),
    ("patch", "/api/v1/users/1"),
    ("post", "/api/v1/prompts"),
    ("post", "/api/v1/rounds"),
    ("get", "/api/v1/rounds"),
    ("get", "/api/v1/rounds/1"),
    ("post", "/api/v1/rounds/1/cancel"),
    ("get", "/api/v1/versions"),
    ("post", "/api/v1/versions/1/publish"),
    ("post", "/api/v1/versions/1/retire"),
    ("get", "/api/v1/leaderboard"),
    ("get", "/api/v1/export"),
    ("post", "/api/v1/import"),
]
AUTHENTICATED = ADMIN_ONLY + [
    ("get", "/api/v1/pairs/next"),
    ("post", "/api/v1/votes"),
    ("get", "/api/v1/prompts"),
    ("get", "/api/v1/stats"),
    ("get", "/api/v1/users/me"),
    ("get", "/api/v1/images/1"),
]


def test_login_issues_a_bearer_token_that_works(env, client):
    r = env.login("admin", "admin-password-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer"
    me = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    assert me.json()["username"] == "admin" and me.json()["role"] == "admin"


def test_wrong_password_and_unknown_user_are_401(env):
    env.user("ann")
    for username, password in [("ann", "wrong-password"), ("nobody", "password-123")]:
        r = env.login(username, password)
        assert r.status_code == 401
        assert r.json() == {"detail": "incorrect username or password"}
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), AUTHENTICATED)
def test_every_protected_endpoint_is_401_without_a_valid_token(env, client, method, path):
    r = client.request(method, path)
    assert r.status_code == 401, (path, r.text)
    assert r.json()["detail"] == "not authenticated"
    r = client.request(method, path, headers={"Authorization": "Bearer not-a-jwt"})
    assert r.status_code == 401


def test_expired_and_forged_tokens_are_401(env, client):
    uid, _ = env.user("ann")
    secret = env.state.settings.secret_key.get_secret_value()
    expired = jwt.encode({"sub": str(uid), "role": "annotator", "exp": 1}, secret, "HS256")
    forged = jwt.encode({"sub": str(uid), "role": "admin", "exp": 4102444800}, "x" * 40, "HS256")
    for token in (expired, forged):
        r = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY)
def test_admin_endpoints_are_403_for_annotators(env, client, method, path):
    _, headers = env.user("ann")
    r = client.request(method, path, headers=headers)
    assert r.status_code == 403, (path, r.text)
    assert r.json() == {"detail": "admin role required"}


def test_role_claim_in_the_token_is_not_trusted(env, client):
    uid, _ = env.user("ann")
    r = client.get("/api/v1/users", headers=env.headers(uid, UserRole.admin))
    assert r.status_code == 403


def test_banned_user_is_rejected_everywhere_and_at_login(env, client):
    uid, headers = env.user("ann")
    assert client.get("/api/v1/stats", headers=headers).status_code == 200
    r = client.patch(f"/api/v1/users/{uid}", json={"status": "banned"}, headers=env.admin_headers())
    assert r.status_code == 200 and r.json()["status"] == "banned"
    for method, path in [
        ("get", "/api/v1/stats"),
        ("get", "/api/v1/pairs/next"),
        ("post", "/api/v1/votes"),
    ]:
        r = client.request(method, path, headers=headers, json={"pair_id": 1, "choice": "left"})
        assert r.status_code == 403 and r.json() == {"detail": "account is banned"}
    assert env.login("ann", "password-123").status_code == 403
    client.patch(f"/api/v1/users/{uid}", json={"status": "active"}, headers=env.admin_headers())
    # the ban ended the old session for good; unbanned, the user logs in again
    assert client.get("/api/v1/stats", headers=headers).status_code == 401
    r = env.login("ann", "password-123")
    assert r.status_code == 200
    fresh = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert client.get("/api/v1/stats", headers=fresh).status_code == 200


def test_admin_cannot_ban_themself(env, client):
    headers = env.admin_headers()
    me = client.get("/api/v1/users/me", headers=headers).json()
    r = client.patch(f"/api/v1/users/{me['id']}", json={"status": "banned"}, headers=headers)
    assert r.status_code == 409


def test_register_when_signup_is_open_then_duplicate_is_409(env, client):
    r = client.post("/api/v1/auth/register", json={"username": "newbie", "password": "long-enough"})
    assert r.status_code == 201, r.text
    assert r.json()["role"] == "annotator"
    assert env.login("newbie", "long-enough").status_code == 200
    r = client.post("/api/v1/auth/register", json={"username": "newbie", "password": "other-pass"})
    assert r.status_code == 409
    assert env.count("users") == 2


def test_register_is_403_when_signup_is_closed(env, client):
    original = env.state.settings
    env.state.settings = original.model_copy(update={"open_signup": False})
    try:
        r = client.post(
            "/api/v1/auth/register", json={"username": "newbie", "password": "long-enough"}
        )
    finally:
        env.state.settings = original
    assert r.status_code == 403
    assert env.count("users") == 1


def test_register_rejects_bad_input_with_422(env, client):
    for body in [
        {"username": "x", "password": "long-enough"},
        {"username": "good_name", "password": "short"},
        {"username": "bad name!", "password": "long-enough"},
        {"username": "good_name"},
    ]:
        r = client.post("/api/v1/auth/register", json=body)
        assert r.status_code == 422
        assert isinstance(r.json()["detail"], list)
    assert env.count("users") == 1


def test_admin_creates_users_and_lists_them(env, client):
    headers = env.admin_headers()
    r = client.post(
        "/api/v1/users",
        headers=headers,
        json={"username": "ann2", "password": "password-123", "daily_cap": 5},
    )
    assert r.status_code == 201 and r.json()["daily_cap"] == 5
    assert (
        client.post(
            "/api/v1/users", headers=headers, json={"username": "ann2", "password": "password-123"}
        ).status_code
        == 409
    )
    listing = client.get("/api/v1/users", headers=headers).json()
    assert listing["count"] == 2
    assert {u["username"] for u in listing["data"]} == {"admin", "ann2"}
    assert all(u["votes"] == 0 for u in listing["data"])
    assert env.login("ann2", "password-123").status_code == 200


def test_login_is_rate_limited_per_username_and_ip(env):
    env.user("ann")
    for _ in range(5):
        assert env.login("ann", "wrong-password").status_code == 401
    r = env.login("ann", "password-123")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "detail" in r.json()
    # another username from the same client is not affected
    assert env.login("admin", "admin-password-1").status_code == 200
