"""The OpenAPI document declares every error status with one schema, and API paths answer
405 for other methods even with the UI mounted at ``/`` (as ``prefloop serve`` mounts it)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse

from backend.main import create_app


@pytest.fixture
def app_with_ui(env):
    """A second app on the same database with a stand-in UI mounted at ``/`` the way
    ``backend.cli.serving_app`` mounts Gradio (``gr.mount_gradio_app(app, demo, path="/")``
    adds a Starlette ``Mount("/")`` after the API's routes)."""

    async def ui(scope, receive, send):
        await PlainTextResponse("the UI", status_code=404)(scope, receive, send)

    app = create_app(env.state.settings, env.dispatcher)
    app.mount("/", ui)
    try:
        yield app
    finally:
        app.state.prefloop.db.dispose()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("TRACE", "/api/v1/votes", "POST"),
        ("GET", "/api/v1/votes", "POST"),
        ("DELETE", "/api/v1/versions/1", "GET"),
        ("PUT", "/api/v1/users/me", "GET, PATCH"),  # /users/{user_id} matches "me" too
    ],
)
def test_other_methods_on_api_paths_are_405_with_the_ui_mounted(app_with_ui, method, path, allow):
    with TestClient(app_with_ui) as c:
        r = c.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    assert r.json() == {"detail": "Method Not Allowed"}


def test_unknown_api_paths_stay_json_404_and_the_rest_goes_to_the_ui(app_with_ui):
    with TestClient(app_with_ui) as c:
        r = c.get("/api/v1/no-such-thing")
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
        r = c.get("/some/page")
        assert r.text == "the UI"
        for i in range(3):
            c.get(f"/api/v1/scan-{i}")
        metrics = c.get("/metrics").text
    assert "scan-" not in metrics  # unmatched paths share one label
    assert 'route="unmatched"' in metrics


def test_without_a_mount_the_answers_are_the_same(client):
    r = client.request("TRACE", "/api/v1/votes")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_every_error_status_uses_the_one_error_schema(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    detail = schemas["ErrorPublic"]["properties"]["detail"]
    kinds = {a.get("type") for a in detail["anyOf"]}
    assert kinds == {"string", "array"}  # a sentence, or the invalid fields
    ref = {"$ref": "#/components/schemas/ErrorPublic"}
    n = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for code, resp in op["responses"].items():
                if int(code) < 400 or path == "/healthz":
                    continue
                assert resp["content"]["application/json"]["schema"] == ref, (path, method, code)
                n += 1
            if path.startswith("/api/"):
                assert "503" in op["responses"], (method, path)
                assert "Retry-After" in op["responses"]["503"]["headers"]
            if op.get("security"):
                assert {"401", "403"} <= set(op["responses"]), (method, path)
    assert n > 150


@pytest.mark.parametrize(
    ("method", "path", "codes"),
    [
        ("post", "/api/v1/auth/token", {"400", "401", "403", "413", "422", "429", "503"}),
        ("post", "/api/v1/auth/register", {"400", "403", "409", "413", "422", "429", "503"}),
        ("post", "/api/v1/prompts", {"400", "401", "403", "409", "413", "415", "422", "503"}),
        ("get", "/api/v1/pairs/next", {"401", "403", "429", "503"}),
        ("post", "/api/v1/votes", {"400", "401", "403", "404", "409", "413", "422", "503"}),
        ("get", "/api/v1/versions/{version_id}", {"401", "403", "404", "422", "503"}),
    ],
)
def test_routes_declare_the_statuses_they_return(client, method, path, codes):
    responses = client.get("/openapi.json").json()["paths"][path][method]["responses"]
    assert {c for c in responses if int(c) >= 400} == codes
