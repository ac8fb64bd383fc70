"""Who may act on a workspace through the Accounts service: the one place that decides it.

Most Accounts calls are admin-only, checked by the interceptor before they run. The calls on one
workspace's own things (its reserved endpoints) are checked here instead, by the servicer, once
it knows which workspace the call touches: today by the admin credential; the dashboard's
sessions (issue 16) extend `Authorizer.workspace` with "or a session of the workspace's owner",
and every workspace-scoped call follows.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from corvex_core.servicers import credentials

# Accounts methods the interceptor leaves to `Authorizer.workspace` (each calls it first).
WORKSPACE_SCOPED: Final = frozenset(
    {
        "CreateEndpoint",
        "ListEndpoints",
        "GetEndpoint",
        "ResizeEndpoint",
        "DeleteEndpoint",
    }
)


class Authorizer:
    def __init__(self, admin_token: str) -> None:
        self._admin_token = admin_token

    def admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Raises InvalidAdminToken unless the call carries the admin credential."""
        credentials.check_admin(context, self._admin_token)

    def workspace(
        self, context: grpc.aio.ServicerContext[Any, Any], workspace_id: str | None
    ) -> None:
        """Raises unless the caller may act on `workspace_id` (None: on no workspace in
        particular, such as every workspace's list, or an id that names nothing, which must
        not tell a stranger whether it exists).

        Today: the admin credential. Issue 16 adds the workspace owner's session here."""
        del workspace_id  # sessions will check it; the admin may act on every workspace
        self.admin(context)
