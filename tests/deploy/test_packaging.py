"""The extras of pyproject.toml match what each role imports: the API and UI run without torch
(the api image installs none), and the workers without the web stack."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

#: import name -> distribution, for the modules one role must not need.
WORKER_ONLY = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "peft": "peft",
    "safetensors": "safetensors",
}
WEB_ONLY = {
    "fastapi": "fastapi",
    "starlette": "fastapi",
    "uvicorn": "uvicorn",
    "gradio": "gradio",
    "orjson": "orjson",
    "pyarrow": "pyarrow",
}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def _run_blocked(blocked: list[str], code: str) -> None:
    # A module set to None in sys.modules raises ImportError on import: as if not installed.
    prelude = f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_extras_split_by_role() -> None:
    extras = {k: _names(v) for k, v in PROJECT["optional-dependencies"].items()}
    base = _names(PROJECT["dependencies"])
    assert set(WORKER_ONLY.values()) <= extras["worker"]
    assert not set(WORKER_ONLY.values()) & (base | extras["api"] | extras["ui"])
    assert not set(WEB_ONLY.values()) & (base | extras["worker"])
    assert {"fastapi", "uvicorn", "orjson", "pyarrow"} <= extras["api"]
    assert "gradio" in extras["ui"]
    assert "prefloop" in extras["dev"]  # make setup installs every role


#: The only modules of ``worker/`` the API imports: the credit maths of ``GET /rounds/credit``,
#: numpy and the standard library only.
API_WORKER_MODULES = {
    "worker",
    "worker.alignment",
    "worker.alignment.credit",
    "worker.alignment.noise_schedule",
}


def test_api_and_ui_import_and_build_without_torch(tmp_path: Path) -> None:
    _run_blocked(
        list(WORKER_ONLY),
        "import backend.cli, backend.main, backend.migrate, ui.app\n"
        "from backend.main import create_app\n"
        "from backend.settings import Settings\n"
        f"s = Settings.model_validate({{'data_dir': {str(tmp_path)!r}, "
        "'admin_password': 'packaging-test-pw', 'secret_key': 'x' * 40})\n"
        "create_app(s)\n"
        # the credit plot's maths runs without torch, on the built-in model's schedule
        "from backend.credit_curve import credit_curve\n"
        "assert credit_curve('dde', 'builtin:shapes', 50).num_train_timesteps == 1000\n"
        "loaded = {m for m in sys.modules if m == 'worker' or m.startswith('worker.')}\n"
        f"assert loaded <= {API_WORKER_MODULES!r}, sorted(loaded)\n",
    )


def test_workers_import_without_the_web_stack() -> None:
    _run_blocked(
        list(WEB_ONLY),
        "import worker.celery_app, worker.tasks, worker.rounds, worker.pair_pool\n"
        "worker.celery_app.create_celery()\n",
    )
