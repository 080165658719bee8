"""``python -m prefloop_client``: the operator commands alone (see :mod:`prefloop_client.cli`)."""

from prefloop_client.cli import main

raise SystemExit(main())
