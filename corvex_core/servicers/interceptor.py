"""The one interceptor of every Corvex RPC: what every call goes through, in order.

1. The request message is decoded; one that is not valid protobuf (garbage, truncated,
   invalid UTF-8 in a string) is refused as INVALID_ARGUMENT, like any bad request.
2. The lifecycle admits the call for what it does (nothing while the ledger recovers, no
   generation while draining, no writes while the journal cannot write).
3. Accounts calls are authorized: the caller's credential (the admin token or a user's
   session) is resolved to a principal, and the resources the request names (workspace_id,
   key_id, an invoice number, endpoint_id) are checked against it by the one rule of
   corvex_core.access, with the call's declared `Access`.
4. The method runs; a domain error ends it with its rich status, a journal failure with
   SERVICE_UNAVAILABLE, a cancelled call quietly, and anything else with INTERNAL and no
   internals (logged with the request id).
Telemetry opens a record for the call before and closes it with the status after; metered
calls (Chat, Embed) then go to the workspace's recent-request log. gRPC's own services
(health, reflection) are left alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from corvex import request_ids
from corvex_core import access, errors
from corvex_core.access import Access, Resource
from corvex_core.activity import Activity
from corvex_core.journal import JournalError
from corvex_core.lifecycle import CallKind, Lifecycle
from corvex_core.servicers import credentials, status
from corvex_core.telemetry import Telemetry

log = logging.getLogger(__name__)

CORVEX_PREFIX: Final = "/corvex.v1."
ACCOUNTS_PREFIX: Final = "/corvex.v1.Accounts/"
# Request fields that name a resource a principal must own (the wire's names).
RESOURCE_FIELDS: Final = {
    "workspace_id": Resource.WORKSPACE,
    "key_id": Resource.KEY,
    "number": Resource.INVOICE,
    "endpoint_id": Resource.ENDPOINT,
}

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class Undecodable:
    """Stands for a request message that could not be decoded."""

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


def _tolerant(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    message_type = method.rsplit("/", 1)[-1] + "Request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return Undecodable(message_type)

    return deserialize


def _bytes_or(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)

    return serialize


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """See the module docstring. `kinds` maps each Corvex method name (e.g. "Chat") to what
    it does and `rules` each Accounts method to its access rule; a method missing from them is
    a bug caught at the first call."""

    def __init__(
        self,
        *,
        admin_token: str,
        directory: access.Directory,
        telemetry: Telemetry,
        lifecycle: Lifecycle,
        activity: Activity,
        kinds: Mapping[str, CallKind],
        rules: Mapping[str, Access],
    ) -> None:
        self._admin_token = admin_token
        self._directory = directory
        self._telemetry = telemetry
        self._lifecycle = lifecycle
        self._activity = activity
        self._kinds = kinds
        self._rules = rules

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Health and reflection are grpc's own services (their streaming methods are async
        # generators); only ours are wrapped.
        if handler is None or not method.startswith(CORVEX_PREFIX):
            return handler
        deserializer = _tolerant(handler.request_deserializer, method)
        if handler.unary_unary is not None:
            return handler._replace(
                request_deserializer=deserializer,
                unary_unary=self.guard(method, handler.unary_unary),
            )
        if handler.unary_stream is not None:
            return handler._replace(
                request_deserializer=deserializer,
                unary_stream=self.guard(method, handler.unary_stream),
            )
        # Streams: each of its requests goes through `guard`, and it writes its batches
        # already serialized (see servicers/streams.py).
        return handler._replace(
            request_deserializer=deserializer,
            response_serializer=_bytes_or(handler.response_serializer),
        )

    def guard(self, method: str, behavior: Behavior) -> Behavior:
        """`behavior` with everything a call of `method` goes through (module docstring)."""
        rpc = method.rsplit("/", 1)[-1]
        kind = self._kinds[rpc]
        rule = self._rules[rpc] if method.startswith(ACCOUNTS_PREFIX) else None
        telemetry, lifecycle, activity = self._telemetry, self._lifecycle, self._activity

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            record = telemetry.begin(rpc, _request_id(context))
            outcome, failure = "OK", None
            try:
                if isinstance(request, Undecodable):
                    raise errors.InvalidRequest(
                        f"The request is not a valid corvex.v1.{request.message_type} message "
                        "(malformed protobuf)."
                    )
                lifecycle.admit_call(kind)
                if rule is not None:
                    await self._authorize(rule, request, context)
                return await behavior(request, context)
            except errors.CorvexError as error:
                outcome, failure = error.reason.value, error
            except JournalError:
                failure = errors.ServiceUnavailable(
                    "The core cannot record changes right now (its journal failed); nothing "
                    "was changed or billed. Retry on another core."
                )
                outcome = failure.reason.value
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            except Exception:
                if context.cancelled():
                    # The client went away while the call was starting (sending metadata
                    # fails then): not an error of ours.
                    outcome = "CANCELLED"
                    raise
                outcome = "INTERNAL"
                extra = {"request_id": record.request_id}
                log.exception("unexpected error in %s", method, extra=extra)
            finally:
                # Counted and logged before the refusal below is sent: whoever has seen the
                # answer finds it in the metrics and the log.
                telemetry.end(record, outcome, failure)
                if kind is CallKind.GENERATE:
                    activity.record(record, outcome)
            # Only a caught error gets here (a return or a raise has left above).
            if failure is not None:
                await status.abort(context, failure)
            else:
                await status.abort_internal(context, record.request_id)

        return guarded

    async def _authorize(
        self, rule: Access, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Resolves the caller and checks it may touch what the request names; the principal
        is then what `access.current()` returns in the servicer."""
        secret = credentials.bearer_secret(credentials.authorization(context))
        principal = await access.resolve(self._directory, secret, self._admin_token, rule)
        fields = request.DESCRIPTOR.fields_by_name
        resources = {
            kind: value
            for name, kind in RESOURCE_FIELDS.items()
            if name in fields and (value := getattr(request, name))
        }
        await access.authorize(self._directory, principal, rule, resources)
        access.set_current(principal)


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's x-request-id if it is sane, else a new one."""
    supplied = next(
        (v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None
    )
    return request_ids.request_id(supplied if isinstance(supplied, str) else None)
