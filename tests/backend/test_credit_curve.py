"""``GET /api/v1/rounds/credit``: a credit scheme over a base model's timesteps, for the
dashboard's plot, against hand-computed values (docs/dde.md, worker/alignment/credit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

URL = "/api/v1/rounds/credit"
SCHEMES = ("dde", "uniform", "dde-stepwise", "dde-single-shot")


def _checkpoint(root: Path, **config: object) -> str:
    """A diffusers-style checkpoint directory holding only its scheduler config."""
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", **config})
    )
    return str(root)


def _tiny(root: Path) -> str:
    """T = 4 and β = 1/2 everywhere: α = 1/2, ᾱ = 1/2, 1/4, 1/8, 1/16."""
    return _checkpoint(
        root, beta_schedule="linear", beta_start=0.5, beta_end=0.5, num_train_timesteps=4
    )


def test_uniform_is_all_ones_on_the_serving_models_schedule(env, client):
    r = client.get(URL, headers=env.admin_headers(), params={"scheme": "uniform", "points": 5000})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scheme"] == "uniform" and body["base_model"] == "builtin:shapes"
    assert body["num_train_timesteps"] == 1000
    assert body["timesteps"] == list(range(1000))
    assert body["weight"] == [1.0] * 1000
    assert body["density"] == pytest.approx([1e-3] * 1000, rel=1e-12)


def test_dde_on_a_tiny_schedule_by_hand(env, client, tmp_path):
    # T = 4: the default band τ_c = T/2 = 2, h = T/10 = 0.4 holds τ = 2 alone, so W = W_2:
    #   k = 1 < τ: a_1 = 1/(2 ᾱ_1) = 1
    #   k = 2 = τ: a_2 (T - τ + 1) = 2 * 3 = 6
    #   k = 3 > τ: (T - 3 + 1) b_3 = 2 * β/(2 α (1 - ᾱ_2)) = 2 * 0.5/(2 * 0.5 * 0.75) = 4/3
    #   k = 4 > τ: (T - 4 + 1) b_4 = 0.5/(2 * 0.5 * 0.875) = 4/7
    # Σ = 187/21, so W (mean 1) = raw * 4 * 21/187 and p = raw * 21/187.
    model = _tiny(tmp_path / "tiny")
    r = client.get(URL, headers=env.admin_headers(), params={"scheme": "dde", "base_model": model})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["base_model"] == model and body["num_train_timesteps"] == 4
    assert body["timesteps"] == [0, 1, 2, 3]
    assert body["weight"] == pytest.approx([84 / 187, 504 / 187, 112 / 187, 48 / 187], rel=1e-12)
    assert body["density"] == pytest.approx([21 / 187, 126 / 187, 28 / 187, 12 / 187], rel=1e-12)
    # Two points: each the mean over two timesteps, at their middle.
    r = client.get(
        URL,
        headers=env.admin_headers(),
        params={"scheme": "dde", "base_model": model, "points": 2},
    )
    body = r.json()
    assert body["timesteps"] == [0.5, 2.5]
    assert body["weight"] == pytest.approx([294 / 187, 80 / 187], rel=1e-12)
    assert body["density"] == pytest.approx([73.5 / 187, 20 / 187], rel=1e-12)


def test_the_ablations_on_the_tiny_schedule(env, client, tmp_path):
    model = _tiny(tmp_path / "tiny")
    h = env.admin_headers()

    def weight(scheme: str) -> list[float]:
        r = client.get(URL, headers=h, params={"scheme": scheme, "base_model": model})
        assert r.status_code == 200, r.text
        return r.json()["weight"]

    # single-shot: a_k = 1/(2 ᾱ_k) = 1, 2, 4, 8; Σ = 15
    assert weight("dde-single-shot") == pytest.approx([4 / 15, 8 / 15, 16 / 15, 32 / 15])
    # stepwise: (T - k + 1) b_k with b_1 = 1/(2 α_1) = 1, b_2 = 0.5/(2 * 0.5 * 0.5) = 1,
    # b_3 = 2/3, b_4 = 4/7: 4, 3, 4/3, 4/7; Σ = 187/21
    assert weight("dde-stepwise") == pytest.approx(
        [4 * 84 / 187, 3 * 84 / 187, 112 / 187, 48 / 187]
    )


def test_the_default_base_model_is_the_serving_versions(env, client, tmp_path):
    model = _tiny(tmp_path / "serving")
    with env.state.db.transaction() as s:
        s.execute(
            text("UPDATE model_versions SET base_model = :m WHERE id = :v"),
            {"m": model, "v": env.base_version_id()},
        )
    body = client.get(URL, headers=env.admin_headers()).json()
    assert body["scheme"] == "dde"  # the default scheme
    assert body["base_model"] == model and body["num_train_timesteps"] == 4


def test_unknown_scheme_is_422_naming_the_known_schemes(env, client):
    r = client.get(URL, headers=env.admin_headers(), params={"scheme": "magic"})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["query", "scheme"]
    assert all(f"'{name}'" in error["msg"] for name in SCHEMES), error


def test_a_base_model_without_a_schedule_is_404_and_a_bad_schedule_422(env, client, tmp_path):
    h = env.admin_headers()
    for missing in (str(tmp_path / "nothing-here"), "someone/not-in-the-cache", "/"):
        r = client.get(URL, headers=h, params={"base_model": missing})
        assert r.status_code == 404, (missing, r.text)
        assert "no scheduler config" in r.json()["detail"]
    bad = tmp_path / "bad"
    (bad / "scheduler").mkdir(parents=True)
    (bad / "scheduler" / "scheduler_config.json").write_text("{not json")
    cubic = _checkpoint(tmp_path / "cubic", beta_schedule="cubic")
    zero_snr = _checkpoint(
        tmp_path / "zero-snr", beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    )
    for model, says in (
        (str(bad), "cannot read"),
        (cubic, "unknown beta_schedule 'cubic'"),
        (zero_snr, "zero-terminal-SNR"),
    ):
        r = client.get(URL, headers=h, params={"base_model": model})
        assert r.status_code == 422, (model, r.text)
        assert says in r.json()["detail"]
    for params in ({"points": 1}, {"points": 10**6}, {"base_model": ""}, {"base_model": "a\x00"}):
        assert client.get(URL, headers=h, params=params).status_code == 422, params


def test_admins_only(env, client):
    _, ann = env.user()
    assert client.get(URL, headers=ann).status_code == 403
    assert client.get(URL).status_code == 401


def test_declared_in_the_openapi_document(client):
    op = client.get("/openapi.json").json()["paths"][URL]["get"]
    assert {"200", "401", "403", "404", "422", "503"} <= set(op["responses"])
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"scheme", "base_model", "points"}
    scheme = params["scheme"]["schema"]
    assert set(scheme["enum"]) == set(SCHEMES) and scheme["default"] == "dde"


def test_the_typed_client(env, client, tmp_path):
    import httpx

    from prefloop_client.api import ApiError, Forbidden, NotFound, PrefloopClient

    def forward(request: httpx.Request) -> httpx.Response:
        r = client.request(
            request.method,
            request.url.raw_path.decode(),
            headers={"Authorization": request.headers.get("Authorization", "")},
        )
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    token = env.admin_headers()["Authorization"].removeprefix("Bearer ")
    _, ann = env.user()
    api = PrefloopClient("http://api.test", transport=httpx.MockTransport(forward))
    body = api.credit_curve(token, "uniform", points=10)
    assert body["num_train_timesteps"] == 1000 and body["weight"] == [1.0] * 10
    assert len(body["timesteps"]) == len(body["density"]) == 10
    tiny = api.credit_curve(token, "dde-single-shot", base_model=_tiny(tmp_path / "t"))
    assert tiny["weight"] == pytest.approx([4 / 15, 8 / 15, 16 / 15, 32 / 15])
    assert api.credit_curve(token)["scheme"] == "dde"
    with pytest.raises(ApiError) as exc:
        api.credit_curve(token, "magic")
    assert exc.value.status_code == 422 and "'dde-stepwise'" in exc.value.detail
    with pytest.raises(NotFound, match="no scheduler config"):
        api.credit_curve(token, base_model=str(tmp_path / "none"))
    with pytest.raises(Forbidden):
        api.credit_curve(ann["Authorization"].removeprefix("Bearer "))
