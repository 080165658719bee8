"""The operator CLI (``prefloop login|whoami|rounds|versions|users|prompts|export|import``)
against a real server (tests/cli/conftest.py): every command, its ``--json`` output, and the
errors for a bad token, an unknown id, a bad config value and an unreachable server.

Commands run in-process through ``backend.cli.main`` (the ``prefloop`` entry point); one test
runs the installed entry point in a subprocess.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from backend.cli import main
from prefloop_client import Forbidden, Pair, PrefloopClient

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "cli-admin-password-1"  # tests/cli/conftest.py's accounts
ANNOTATOR = ("ann_cli", "annotator-pw-1")


@pytest.fixture
def cli(live_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):  # type: ignore[no-untyped-def]
    """Run ``prefloop ARGS``; returns ``(exit status, stdout, stderr)``. Signed in as admin
    (the token saved by ``prefloop login`` in a per-test credentials file)."""
    monkeypatch.setenv("PREFLOOP_CREDENTIALS", str(tmp_path / "credentials.json"))
    monkeypatch.setenv("PREFLOOP_API_URL", live_api.url)
    monkeypatch.delenv("PREFLOOP_TOKEN", raising=False)
    monkeypatch.setenv("PREFLOOP_PASSWORD", ADMIN_PASSWORD)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    assert run("login")[0] == 0
    monkeypatch.delenv("PREFLOOP_PASSWORD")
    return run


def test_login_saves_a_private_token_and_whoami_uses_it(cli, live_api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    saved = tmp_path / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["url"] == live_api.url
    code, out, _ = cli("whoami")
    assert (code, out.strip()) == (0, f"admin (admin, active) at {live_api.url}")
    code, out, _ = cli("whoami", "--json")
    assert code == 0 and json.loads(out)["role"] == "admin"


def test_a_bad_token_a_missing_login_and_a_wrong_password_say_what_to_do(
    cli, live_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PREFLOOP_TOKEN", "not-a-token")
    code, out, err = cli("rounds", "list")
    assert code == 1 and out == ""
    assert f"the server at {live_api.url} refused the token" in err
    assert "run `prefloop login` or set PREFLOOP_TOKEN" in err
    monkeypatch.delenv("PREFLOOP_TOKEN")

    monkeypatch.setenv("PREFLOOP_CREDENTIALS", str(tmp_path / "none.json"))
    code, _, err = cli("versions", "list")
    assert code == 2
    assert f"not signed in to {live_api.url}: run `prefloop login --url {live_api.url}`" in err

    monkeypatch.setenv("PREFLOOP_PASSWORD", "wrong-password")
    code, _, err = cli("login")
    assert code == 1 and "wrong username or password for 'admin'" in err

    code, _, err = cli("rounds", "list", "--url", "http://127.0.0.1:1")
    assert code == 2 and "not signed in to http://127.0.0.1:1" in err  # the token is not sent
    monkeypatch.setenv("PREFLOOP_TOKEN", "anything")
    code, _, err = cli("rounds", "list", "--url", "http://127.0.0.1:1")
    assert code == 3 and "cannot reach the API at http://127.0.0.1:1" in err
    assert "is the server running?" in err


def test_an_annotator_token_is_forbidden(cli, live_api, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with PrefloopClient(live_api.url) as client:
        monkeypatch.setenv("PREFLOOP_TOKEN", client.login(*ANNOTATOR))
    code, _, err = cli("users", "list")
    assert code == 1 and "forbidden:" in err and "need an admin account" in err


def test_rounds_start_list_show_cancel_and_defaults(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("rounds", "defaults", "--json")
    defaults = json.loads(out)
    assert code == 0 and defaults["base_model"] == "builtin:shapes"
    assert {"beta", "learning_rate", "steps", "lora_rank", "scheme"} <= set(defaults["config"])
    code, out, _ = cli("rounds", "defaults")
    assert code == 0 and out.startswith("base model: builtin:shapes\n")

    code, out, _ = cli("rounds", "start", "--set", "steps=7", "--set", "beta=250.5", "--json")
    assert code == 0
    round_id = json.loads(out)["round_id"]
    code, out, _ = cli("rounds", "start", "--set", "steps=5")
    assert code == 0 and out.startswith("round ") and out.strip().endswith(" queued")

    code, out, _ = cli("rounds", "show", str(round_id), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "queued"
    assert shown["config"]["steps"] == 7 and shown["config"]["beta"] == 250.5
    # the other fields keep the family's defaults
    assert shown["config"]["lora_rank"] == defaults["config"]["lora_rank"]
    code, out, _ = cli("rounds", "show", str(round_id))
    assert code == 0 and "status" in out and "queued" in out and "config:" in out

    code, out, _ = cli("rounds", "list", "--json")
    assert code == 0 and round_id in [r["id"] for r in json.loads(out)]
    code, out, _ = cli("rounds", "list", "--status", "queued")
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["id", "status", "step"]
    assert any(row.split()[:2] == [str(round_id), "queued"] for row in rows)

    code, out, _ = cli("rounds", "cancel", str(round_id))
    assert (code, out.strip()) == (0, f"round {round_id}: cancelled")
    code, _, err = cli("rounds", "cancel", str(round_id))
    assert code == 1 and "HTTP 409" in err  # already finished


def test_rounds_errors_name_the_bad_value_and_the_unknown_id(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = cli("rounds", "start", "--set", "beta=abc")
    assert code == 1 and err.startswith("prefloop: rejected: config.beta: ")
    code, _, err = cli("rounds", "start", "--set", "no_such_field=1")
    assert code == 1 and "config.no_such_field" in err
    code, _, err = cli("rounds", "start", "--set", "steps")
    assert code == 2 and "--set 'steps': write it as key=value" in err
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2]")
    code, _, err = cli("rounds", "start", "--config", str(bad))
    assert code == 2 and "must hold a JSON object" in err
    code, _, err = cli("rounds", "show", "987654")
    assert (code, err.strip()) == (1, "prefloop: not found: round 987654 not found")
    code, _, err = cli("rounds", "cancel", "987654")
    assert code == 1 and "round 987654 not found" in err


def test_versions_list_publish_rollback_retire(cli, live_api) -> None:  # type: ignore[no-untyped-def]
    cand, base = live_api.candidate_id, live_api.base_id
    code, out, _ = cli("versions", "list", "--json")
    by_id = {v["id"]: v for v in json.loads(out)}
    assert code == 0 and by_id[cand]["status"] == "candidate" and by_id[cand]["parent_id"] == base
    code, out, _ = cli("versions", "list", "--status", "candidate")
    assert "cli-candidate" in out and "builtin:shapes" not in out

    code, out, _ = cli("versions", "publish", str(cand), "--json")
    assert code == 0 and json.loads(out)["status"] == "published"
    code, out, _ = cli("versions", "rollback", str(cand), "--reason", "cli test")
    assert code == 0 and out.startswith(f"version {cand} (")
    code, out, _ = cli("versions", "list", "--json")
    by_id = {v["id"]: v for v in json.loads(out)}
    assert by_id[base]["status"] == "published" and by_id[cand]["status"] != "published"

    code, _, err = cli("versions", "retire", str(base))
    assert code == 1 and "HTTP 409" in err  # the serving version cannot be retired
    code, _, err = cli("versions", "publish", "987654")
    assert code == 1 and "not found: version 987654 not found" in err
    code, _, err = cli("versions", "rollback", str(base))
    assert code == 1 and "HTTP 409" in err  # the base has no parent


def test_users_create_ban_unban(cli, live_api) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("users", "create", "bob_cli", "--password", "bob-password-1", "--json")
    bob = json.loads(out)
    assert code == 0 and bob["username"] == "bob_cli" and bob["role"] == "annotator"
    code, _, err = cli("users", "create", "bob_cli", "--password", "bob-password-1")
    assert code == 1 and "HTTP 409" in err

    with PrefloopClient(live_api.url) as client:
        token = client.login("bob_cli", "bob-password-1")
        code, out, err = cli("users", "ban", "bob_cli")
        assert (code, out.strip()) == (0, f"user 'bob_cli' (id {bob['id']}) is banned"), err
        with pytest.raises(Forbidden, match="banned"):
            client.next_pair(token)  # the banned annotator's next request is refused
        code, out, _ = cli("users", "unban", str(bob["id"]), "--json")
        assert code == 0 and json.loads(out)["status"] == "active"
        # a ban ends the account's sessions; once unbanned it signs in again
        token = client.login("bob_cli", "bob-password-1")
        assert client.me(token)["status"] == "active"
        code, out, err = cli("users", "shadow-ban", "bob_cli")
        assert (code, out.strip()) == (0, f"user 'bob_cli' (id {bob['id']}) is shadow_banned"), err
        assert client.me(token)["status"] == "shadow_banned"  # still signed in, still serving
        cli("users", "unban", "bob_cli")

    code, out, _ = cli("users", "list")
    row = next(line for line in out.splitlines() if " bob_cli " in f" {line} ")
    assert row.split()[:4] == [str(bob["id"]), "bob_cli", "annotator", "active"]
    code, _, err = cli("users", "ban", "nobody_here")
    assert code == 1 and "no user named 'nobody_here'" in err
    code, _, err = cli("users", "ban", "987654")
    assert code == 1 and "user 987654 not found" in err


def test_prompts_add_list_activate_deactivate(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("prompts", "add", "a blue circle", "a green triangle", "--source", "cli")
    assert (code, out.strip()) == (0, "2 prompts added, 0 already there")
    code, out, _ = cli("prompts", "add", "a blue circle", "--json")
    assert code == 0 and json.loads(out) == {"created": 0, "existing": 1}
    file = tmp_path / "prompts.txt"
    file.write_text("a yellow star\na purple square\n")
    code, out, _ = cli("prompts", "add", "--file", str(file))
    assert (code, out.strip()) == (0, "2 prompts added, 0 already there")
    code, _, err = cli("prompts", "add")
    assert code == 2 and "give prompt texts or --file" in err

    code, out, _ = cli("prompts", "list", "--json", "--limit", "100")
    listed = {p["text"]: p for p in json.loads(out)}
    assert {"a blue circle", "a green triangle", "a yellow star", "a purple square"} <= set(listed)
    assert listed["a blue circle"]["source"] == "cli"
    code, out, _ = cli("prompts", "list", "--inactive")
    assert (code, out.strip()) == (0, "(none)")

    circle = listed["a blue circle"]["id"]
    code, out, _ = cli("prompts", "deactivate", str(circle))
    assert (code, out.strip()) == (0, f"prompt {circle} is inactive: a blue circle")
    code, out, _ = cli("prompts", "list", "--inactive", "--json")
    assert [p["text"] for p in json.loads(out)] == ["a blue circle"]
    code, out, _ = cli("prompts", "activate", str(circle), "--json")
    assert code == 0 and json.loads(out)["active"] is True
    code, _, err = cli("prompts", "activate", "987654")
    assert code == 1 and "not found: prompt 987654 not found" in err


def test_export_then_import_round_trips_the_votes(cli, live_api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with PrefloopClient(live_api.url) as client:
        token = client.login(*ANNOTATOR)
        for choice in ("left", "right"):
            pair = client.next_pair(token)
            assert isinstance(pair, Pair)
            client.vote(token, pair_id=pair.pair_id, choice=choice)

    parquet = tmp_path / "votes.parquet"
    code, out, _ = cli("export", "-o", str(parquet), "--json")
    assert code == 0 and json.loads(out)["bytes"] == parquet.stat().st_size > 0
    assert pq.read_table(parquet).num_rows == 2
    code, out, _ = cli("export", "--format", "jsonl", "-o", str(tmp_path / "votes.jsonl"))
    assert code == 0 and out.startswith("wrote ") and "(jsonl)" in out
    assert len((tmp_path / "votes.jsonl").read_text().splitlines()) == 2

    code, out, _ = cli("import", str(parquet), "--json")
    result = json.loads(out)
    assert code == 0 and (result["pairs"], result["votes"], result["rows"]) == (2, 2, 2)
    code, _, err = cli("import", str(tmp_path / "missing.parquet"))
    assert code == 2 and "cannot read" in err
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    code, _, err = cli("import", str(tmp_path / "bad.parquet"))
    assert code == 1 and err.startswith("prefloop: rejected: ")


def test_the_installed_entry_point_runs_the_commands(live_api, tmp_path: Path) -> None:
    with PrefloopClient(live_api.url) as client:
        token = client.login("admin", ADMIN_PASSWORD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env.update(PREFLOOP_TOKEN=token, PREFLOOP_API_URL=live_api.url)
    env["PREFLOOP_CREDENTIALS"] = str(tmp_path / "credentials.json")
    prefloop = Path(sys.executable).with_name("prefloop")
    proc = subprocess.run(
        [str(prefloop), "versions", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "builtin:shapes" in {v["name"] for v in json.loads(proc.stdout)}
    proc = subprocess.run(
        [sys.executable, "-m", "prefloop_client", "whoami"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("admin (admin, active)"), proc.stderr
