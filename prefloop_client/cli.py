"""The operator commands of ``prefloop``, on the typed v1 client (HTTP only).

``prefloop login`` signs in and keeps the token in ``~/.config/prefloop/credentials.json``
(``PREFLOOP_CREDENTIALS`` moves it); ``PREFLOOP_TOKEN`` overrides it. The server is
``--url``, else ``PREFLOOP_API_URL``, else the one signed in to, else
``http://127.0.0.1:8000``. Every command takes ``--json`` (the API's answer, for scripts).

Exit status: 0 done; 1 the server refused (the message says why and what to do); 2 a usage
or local error (not signed in, a file that cannot be read, a malformed ``--set``); 3 the
server could not be reached.

``backend.cli`` adds these commands to ``prefloop`` beside ``serve``, ``migrate`` and
``create-user``; ``python -m prefloop_client`` runs them alone (no server code needed).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop_client.api import (
    ApiError,
    ApiUnavailable,
    Forbidden,
    NotFound,
    PrefloopClient,
    Unauthorized,
    normalize_base_url,
)

DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "PREFLOOP_API_URL"
ENV_TOKEN = "PREFLOOP_TOKEN"
ENV_CREDENTIALS = "PREFLOOP_CREDENTIALS"
ENV_PASSWORD = "PREFLOOP_PASSWORD"

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CliError(Exception):
    """A local problem, reported as ``prefloop: <message>`` with exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------ credentials
def credentials_path() -> Path:
    override = os.environ.get(ENV_CREDENTIALS)
    if override:
        return Path(override).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "prefloop" / "credentials.json"


def _read_credentials() -> dict[str, str]:
    path = credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}; delete it and run `prefloop login`") from exc
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _save_credentials(url: str, username: str, token: str) -> Path:
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "username": username, "token": token}, fh)
    tmp.replace(path)
    return path


def resolve_url(flag: str | None) -> str:
    raw = flag or os.environ.get(ENV_URL) or _read_credentials().get("url") or DEFAULT_URL
    try:
        return normalize_base_url(raw)
    except ValueError as exc:
        raise CliError(f"bad server URL: {exc} (set --url or {ENV_URL})") from exc


def resolve_token(url: str) -> str:
    token = os.environ.get(ENV_TOKEN, "").strip()
    if token:
        return token
    saved = _read_credentials()
    if saved.get("token") and saved.get("url") == url:
        return saved["token"]
    where = f" (the saved token is for {saved['url']})" if saved.get("url") else ""
    raise CliError(
        f"not signed in to {url}{where}: run `prefloop login --url {url}` or set {ENV_TOKEN}"
    )


# ------------------------------------------------------------------------------ output
@dataclass
class Ctx:
    """What a command gets: the client, the server URL, the token (None for ``login``)."""

    client: PrefloopClient
    url: str
    token: str
    as_json: bool

    def emit(self, data: Any, text: str | Callable[[], str]) -> None:
        if self.as_json:
            print(json.dumps(data, indent=2, sort_keys=True, default=str))
        else:
            print(text() if callable(text) else text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table of ``rows``; ``columns`` are ``(key, header)`` pairs."""
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [
        max(len(header), *(len(r[i]) for r in cells)) for i, (_, header) in enumerate(columns)
    ]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def fields(data: Mapping[str, Any], indent: str = "") -> str:
    """``key: value`` lines; nested mappings are indented below their key."""
    width = max((len(k) for k in data), default=0)
    lines = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            lines.append(f"{indent}{key}:")
            lines.append(fields(value, indent + "  "))
        elif isinstance(value, list):
            lines.append(f"{indent}{key.ljust(width)}  {', '.join(_cell(v) for v in value)}")
        else:
            lines.append(f"{indent}{key.ljust(width)}  {_cell(value)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ commands
def cmd_login(a: argparse.Namespace, client: PrefloopClient, url: str) -> int:
    password = os.environ.get(ENV_PASSWORD) or (
        sys.stdin.readline().rstrip("\n") if a.password_stdin else getpass.getpass("password: ")
    )
    token = client.login(a.username, password)
    me = client.me(token)
    path = _save_credentials(url, a.username, token)
    if a.json:
        print(json.dumps({"url": url, "user": me, "credentials": str(path)}, default=str))
    else:
        print(f"signed in to {url} as {me.get('username')} ({me.get('role')}); token in {path}")
    return 0


def cmd_whoami(c: Ctx, a: argparse.Namespace) -> None:
    me = c.client.me(c.token)
    c.emit(me, f"{me.get('username')} ({me.get('role')}, {me.get('status')}) at {c.url}")


ROUND_COLUMNS = (
    ("id", "id"),
    ("status", "status"),
    ("step", "step"),
    ("total_steps", "of"),
    ("version_id", "version"),
    ("parent_version_id", "parent"),
    ("created_at", "created"),
)


def cmd_rounds_list(c: Ctx, a: argparse.Namespace) -> None:
    rows = c.client.list_rounds(c.token, status=a.status, limit=a.limit)
    c.emit(rows, lambda: table(rows, ROUND_COLUMNS))


def cmd_rounds_show(c: Ctx, a: argparse.Namespace) -> None:
    rnd = c.client.get_round(c.token, a.round_id)
    c.emit(rnd, lambda: fields(rnd))


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` items as a config dict; a value is read as JSON when it parses
    (``3``, ``0.5``, ``true``, ``[1, 2]``), else kept as text (``--set scheme=uniform``)."""
    config: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set {item!r}: write it as key=value, e.g. --set beta=500")
        try:
            config[key.strip()] = json.loads(value)
        except ValueError:
            config[key.strip()] = value
    return config


def cmd_rounds_start(c: Ctx, a: argparse.Namespace) -> None:
    config: dict[str, Any] = {}
    if a.config:
        try:
            loaded = json.loads(Path(a.config).read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"--config {a.config}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise CliError(f"--config {a.config}: the file must hold a JSON object")
        config.update(loaded)
    config.update(parse_sets(a.set or ()))
    round_id = c.client.start_round(c.token, config, parent_version_id=a.parent_version)
    c.emit({"round_id": round_id, "status": "queued"}, f"round {round_id} queued")


def cmd_rounds_cancel(c: Ctx, a: argparse.Namespace) -> None:
    rnd = c.client.cancel_round(c.token, a.round_id)
    c.emit(rnd, f"round {a.round_id}: {rnd.get('status')}")


def cmd_rounds_defaults(c: Ctx, a: argparse.Namespace) -> None:
    body = c.client.round_config_defaults(c.token, a.parent_version)
    c.emit(body, lambda: f"base model: {body.get('base_model')}\n" + fields(body["config"]))


VERSION_COLUMNS = (
    ("id", "id"),
    ("name", "name"),
    ("status", "status"),
    ("parent_id", "parent"),
    ("created_by_round", "round"),
    ("published_at", "published"),
)


def cmd_versions_list(c: Ctx, a: argparse.Namespace) -> None:
    rows = c.client.list_versions(c.token, status=a.status, limit=a.limit)
    c.emit(rows, lambda: table(rows, VERSION_COLUMNS))


def _version_action(action: str) -> Callable[[Ctx, argparse.Namespace], None]:
    def run(c: Ctx, a: argparse.Namespace) -> None:
        if action == "publish":
            body = c.client.publish_version(c.token, a.version_id)
        elif action == "retire":
            body = c.client.retire_version(c.token, a.version_id)
        else:
            body = c.client.rollback_version(c.token, a.version_id, a.reason)
        notes = "".join(f"\n  {n}" for n in body.get("notes") or ())
        c.emit(
            body, f"version {body.get('id')} ({body.get('status')}): {body.get('message')}{notes}"
        )

    return run


def cmd_export(c: Ctx, a: argparse.Namespace) -> None:
    content, content_type, filename = c.client.export(c.token, a.format)
    out = Path(a.output or filename or f"prefloop-export.{a.format}")
    try:
        out.write_bytes(content)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc}") from exc
    info = {"path": str(out), "bytes": len(content), "content_type": content_type}
    c.emit(info, f"wrote {len(content)} bytes ({a.format}) to {out}")


def cmd_import(c: Ctx, a: argparse.Namespace) -> None:
    path = Path(a.path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc}") from exc
    result = c.client.import_dataset(c.token, path.name, content)
    c.emit(result, lambda: f"imported {path}:\n" + fields(result))


USER_COLUMNS = (
    ("id", "id"),
    ("username", "username"),
    ("role", "role"),
    ("status", "status"),
    ("votes", "votes"),
    ("gold_accuracy", "gold acc."),
    ("agreement_with_majority", "agreement"),
    ("krippendorff_alpha", "alpha"),
    ("flags", "flags"),
)


def cmd_users_list(c: Ctx, a: argparse.Namespace) -> None:
    rows = c.client.list_users(c.token, limit=a.limit)
    c.emit(rows, lambda: table(rows, USER_COLUMNS))


def cmd_users_create(c: Ctx, a: argparse.Namespace) -> None:
    password = a.password or getpass.getpass(f"password for {a.username}: ")
    user = c.client.create_user(c.token, a.username, password, role=a.role)
    c.emit(user, f"created {user.get('role')} {user.get('username')!r} (id {user.get('id')})")


def _user_id(c: Ctx, who: str) -> int:
    """A user id from an id or a username (looked up in ``GET /users``)."""
    if who.isdigit():
        return int(who)
    offset = 0
    while page := c.client.list_users(c.token, limit=500, offset=offset):
        for user in page:
            if user.get("username") == who:
                return int(user["id"])
        offset += len(page)
    raise CliError(f"no user named {who!r}: `prefloop users list` shows them", EXIT_REFUSED)


def _user_status(status: str) -> Callable[[Ctx, argparse.Namespace], None]:
    def run(c: Ctx, a: argparse.Namespace) -> None:
        user_id = _user_id(c, a.user)
        user = c.client.update_user(c.token, user_id, status=status)
        c.emit(user, f"user {user.get('username')!r} (id {user.get('id')}) is {user.get('status')}")

    return run


def cmd_prompts_add(c: Ctx, a: argparse.Namespace) -> None:
    if bool(a.file) == bool(a.text):
        raise CliError("give prompt texts or --file PATH (a .txt, .csv or .jsonl file), not both")
    if a.file:
        path = Path(a.file)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc}") from exc
        kind = {".csv": "text/csv", ".jsonl": "application/jsonl"}.get(path.suffix, "text/plain")
        result = c.client.upload_prompts(c.token, path.name, content, kind)
    else:
        items = [{"text": t, "source": a.source} if a.source else t for t in a.text]
        result = c.client.add_prompts(c.token, items)
    c.emit(
        result,
        f"{result.get('created')} prompts added, {result.get('existing')} already there",
    )


def _prompt_active(active: bool) -> Callable[[Ctx, argparse.Namespace], None]:
    def run(c: Ctx, a: argparse.Namespace) -> None:
        prompt = c.client.set_prompt_active(c.token, a.prompt_id, active)
        state = "active" if prompt.get("active") else "inactive"
        c.emit(prompt, f"prompt {prompt.get('id')} is {state}: {prompt.get('text')}")

    return run


def cmd_prompts_list(c: Ctx, a: argparse.Namespace) -> None:
    rows = c.client.list_prompts(c.token, active=a.active, limit=a.limit, offset=a.offset)
    columns = (("id", "id"), ("active", "active"), ("source", "source"), ("text", "text"))
    c.emit(rows, lambda: table(rows, columns))


# ------------------------------------------------------------------------------ errors
def describe_error(exc: ApiError | ApiUnavailable, url: str) -> tuple[str, int]:
    """The message and exit status for an API failure, saying what to do next."""
    if isinstance(exc, ApiUnavailable):
        return (
            f"{exc}; is the server running? Point at it with --url or {ENV_URL}",
            EXIT_UNREACHABLE,
        )
    if isinstance(exc, Unauthorized):
        return (
            f"the server at {url} refused the token ({exc.detail}): run `prefloop login` "
            f"or set {ENV_TOKEN} to a valid token",
            EXIT_REFUSED,
        )
    if isinstance(exc, Forbidden):
        return f"forbidden: {exc.detail} (these commands need an admin account)", EXIT_REFUSED
    if isinstance(exc, NotFound):
        return f"not found: {exc.detail}", EXIT_REFUSED
    if exc.status_code == 422:
        return f"rejected: {exc.detail}", EXIT_REFUSED
    return f"HTTP {exc.status_code}: {exc.detail}", EXIT_REFUSED


# ------------------------------------------------------------------------------ wiring
Handler = Callable[[Ctx, argparse.Namespace], None]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help=f"the server (default: ${ENV_URL}, the login's, {DEFAULT_URL})"
    )
    common.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    return common


def add_commands(sub: Any) -> None:
    """Add the operator commands to ``sub`` (an ``add_subparsers`` result)."""
    common = _common()

    def leaf(parent: Any, name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_)
        p.set_defaults(func=_run_api(handler))
        return p

    def group(name: str, help_: str) -> Any:
        p = sub.add_parser(name, help=help_)
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    p = sub.add_parser("login", parents=[common], help="sign in to a server and keep the token")
    p.add_argument("--username", default="admin")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the password from stdin (else ${ENV_PASSWORD}, else a prompt)",
    )
    p.set_defaults(func=_run_login)
    leaf(sub, "whoami", cmd_whoami, "the signed-in account")

    rounds = group("rounds", "training rounds")
    p = leaf(rounds, "list", cmd_rounds_list, "rounds, newest first")
    p.add_argument(
        "--status", choices=["queued", "running", "evaluating", "succeeded", "failed", "cancelled"]
    )
    p.add_argument("--limit", type=int, default=50)
    p = leaf(rounds, "show", cmd_rounds_show, "one round: status, progress, config, metrics")
    p.add_argument("round_id", type=int)
    p = leaf(rounds, "start", cmd_rounds_start, "queue a round (config: the defaults + --set)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a config override, e.g. --set steps=200 --set scheme=uniform (repeatable)",
    )
    p.add_argument("--config", metavar="FILE", help="a JSON object of config overrides")
    p.add_argument("--parent-version", type=int, help="train from this version (default: serving)")
    p = leaf(rounds, "cancel", cmd_rounds_cancel, "cancel a queued or running round")
    p.add_argument("round_id", type=int)
    p = leaf(rounds, "defaults", cmd_rounds_defaults, "the config a round gets with no overrides")
    p.add_argument("--parent-version", type=int)

    versions = group("versions", "model versions")
    p = leaf(versions, "list", cmd_versions_list, "versions, newest first")
    p.add_argument("--status", choices=["candidate", "published", "retired"])
    p.add_argument("--limit", type=int, default=50)
    for action, help_ in (
        ("publish", "make a version the serving one"),
        ("retire", "retire a candidate"),
        ("rollback", "publish the serving version's parent again"),
    ):
        p = leaf(versions, action, _version_action(action), help_)
        p.add_argument("version_id", type=int)
        if action == "rollback":
            p.add_argument("--reason", help="kept in the version's metrics")

    p = leaf(sub, "export", cmd_export, "download the human preferences")
    p.add_argument("--format", choices=["pickapic", "jsonl"], default="pickapic")
    p.add_argument("-o", "--output", help="the file to write (default: the server's name)")
    p = leaf(sub, "import", cmd_import, "import a Pick-a-Pic parquet file as pairs with votes")
    p.add_argument("path")

    users = group("users", "accounts")
    p = leaf(users, "list", cmd_users_list, "accounts with their volume and reliability")
    p.add_argument("--limit", type=int, default=100)
    p = leaf(users, "create", cmd_users_create, "create an account")
    p.add_argument("username")
    p.add_argument("--password", help="read from a prompt when omitted")
    p.add_argument("--role", choices=["annotator", "admin"], default="annotator")
    for action, status in (
        ("ban", "banned"),
        ("shadow-ban", "shadow_banned"),  # keeps voting; the votes never train or count
        ("unban", "active"),
    ):
        p = leaf(users, action, _user_status(status), f"{action} an account (id or username)")
        p.add_argument("user", help="the user's id or username")

    prompts = group("prompts", "the prompts images are drawn for")
    p = leaf(prompts, "add", cmd_prompts_add, "add prompts (texts, or a .txt/.csv/.jsonl file)")
    p.add_argument("text", nargs="*", help="prompt texts")
    p.add_argument("--file", help="a .txt (one a line), .csv or .jsonl prompt file")
    p.add_argument("--source", help="where the texts come from (kept with each)")
    for action, active in (("activate", True), ("deactivate", False)):
        p = leaf(prompts, action, _prompt_active(active), f"{action} a prompt (new images)")
        p.add_argument("prompt_id", type=int)
    p = leaf(prompts, "list", cmd_prompts_list, "prompts, oldest first")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--active", dest="active", action="store_const", const=True)
    state.add_argument("--inactive", dest="active", action="store_const", const=False)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)


def _fail(message: str, code: int) -> int:
    print(f"prefloop: {message}", file=sys.stderr)
    return code


def _run_api(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        try:
            url = resolve_url(a.url)
            token = resolve_token(url)
        except CliError as exc:
            return _fail(str(exc), exc.code)
        with PrefloopClient(url) as client:
            try:
                handler(Ctx(client, url, token, a.json), a)
            except CliError as exc:
                return _fail(str(exc), exc.code)
            except (ApiError, ApiUnavailable) as exc:
                return _fail(*describe_error(exc, url))
        return 0

    return run


def _run_login(a: argparse.Namespace) -> int:
    try:
        url = resolve_url(a.url)
        with PrefloopClient(url) as client:
            return cmd_login(a, client, url)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except Unauthorized:
        return _fail(f"wrong username or password for {a.username!r} at {url}", EXIT_REFUSED)
    except (ApiError, ApiUnavailable) as exc:
        return _fail(*describe_error(exc, url))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefloop", description="Prefloop's operator commands (over the v1 HTTP API)."
    )
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))
