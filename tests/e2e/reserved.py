"""What the reserved-endpoint tests share (one core: test_reserved_endpoints.py; a cluster:
test_cluster_reserved.py): the offering they rent, polling for a state, and the admin reads."""

from __future__ import annotations

import time
from collections.abc import Callable

from corvex.v1 import accounts_pb2 as pb
from corvex_ops.admin import Client

FLASH = "deepseek-v4-flash-1gpu"  # $2.52 per replica-hour: 700,000 nano-USD per replica-second


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    """Polls until `condition` holds; fails, saying `what`, if it never does."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.05)


def endpoint(admin: Client, endpoint_id: str) -> pb.Endpoint:
    found: pb.Endpoint = admin.GetEndpoint(pb.GetEndpointRequest(endpoint_id=endpoint_id))
    return found


def balance(admin: Client, workspace_id: str) -> int:
    ws = admin.GetWorkspace(pb.GetWorkspaceRequest(workspace_id=workspace_id))
    return int(ws.balance_nano_usd)
