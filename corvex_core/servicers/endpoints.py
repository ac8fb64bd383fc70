"""The reserved-endpoint calls of the Accounts service: wire → corvex_core.reserved (or, in a
cluster, corvex_core.reserved_cluster) → wire.

Who may make each call is the interceptor's (corvex_core.access, by the workspace or endpoint
the request names); each call acknowledges a change only once it is durable: on the journal's
disk, or committed to PostgreSQL in a cluster. The lifecycle and the money are the endpoints'
modules'.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

from google.protobuf import timestamp_pb2

from corvex.quoting import quote
from corvex.ratecard import ReservedOffering
from corvex.v1 import accounts_pb2, inference_pb2
from corvex_core import errors
from corvex_core.cluster.link import Link
from corvex_core.pg import db
from corvex_core.reserved import EndpointEngines, EndpointView, ReservedEndpoints, Status
from corvex_core.reserved_cluster import ClusterEndpoints

Context: TypeAlias = Any

# The wire's enum names each status ENDPOINT_STATUS_<NAME>.
STATUSES: Final = {
    s: accounts_pb2.EndpointStatus.Value(f"ENDPOINT_STATUS_{s.name}") for s in Status
}


class EndpointRpcs:
    """Mixed into the Accounts servicer, which provides these attributes and `_sync`."""

    _reserved: ReservedEndpoints
    _create_wait_s: float

    async def _sync(self) -> None:
        raise NotImplementedError

    async def CreateEndpoint(
        self, request: accounts_pb2.CreateEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        view = self._reserved.create(
            request.workspace_id, request.offering, request.replicas, request.name
        )
        await self._sync()
        await self._reserved.wait_started(view.endpoint.id, self._create_wait_s)
        # The first period is charged when the replicas are ready: on disk before it is shown.
        await self._sync()
        return endpoint_pb(self._reserved.view(view.endpoint.id))

    async def ListEndpoints(
        self, request: accounts_pb2.ListEndpointsRequest, context: Context
    ) -> accounts_pb2.ListEndpointsResponse:
        views = self._reserved.views(request.workspace_id or None)
        return accounts_pb2.ListEndpointsResponse(endpoints=[endpoint_pb(v) for v in views])

    async def GetEndpoint(
        self, request: accounts_pb2.GetEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        self._known(request.endpoint_id)
        return endpoint_pb(self._reserved.view(request.endpoint_id))

    async def ResizeEndpoint(
        self, request: accounts_pb2.ResizeEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        self._known(request.endpoint_id)
        view = self._reserved.resize(request.endpoint_id, request.replicas)
        await self._sync()
        return endpoint_pb(view)

    async def DeleteEndpoint(
        self, request: accounts_pb2.DeleteEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        self._known(request.endpoint_id)
        view = self._reserved.delete(request.endpoint_id)
        await self._sync()
        return endpoint_pb(view)

    async def ListReservedCapacity(
        self, request: accounts_pb2.ListReservedCapacityRequest, context: Context
    ) -> accounts_pb2.ListReservedCapacityResponse:
        return capacity_pb(self._reserved)

    def _known(self, endpoint_id: str) -> None:
        """NotFound for an id that names no endpoint (the admin's calls reach here with any)."""
        if self._reserved.find(endpoint_id) is None:
            raise errors.NotFound(f"No reserved endpoint {quote(endpoint_id)}.")


class ClusterEndpointRpcs:
    """The same calls in a cluster, mixed into its Accounts servicer (which provides these
    attributes). Each reaches PostgreSQL; an unreachable database is a clean UNAVAILABLE."""

    _endpoints: ClusterEndpoints
    _create_wait_s: float
    _link: Link

    async def CreateEndpoint(
        self, request: accounts_pb2.CreateEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        with db.purpose("accounts"), self._link.watching():
            view = await self._endpoints.create(
                request.workspace_id, request.offering, request.replicas, request.name
            )
        # The first period is charged (committed) when the replicas are ready.
        await self._endpoints.wait_started(view.endpoint.id, self._create_wait_s)
        with db.purpose("accounts"), self._link.watching():
            return endpoint_pb(await self._endpoints.get(view.endpoint.id))

    async def ListEndpoints(
        self, request: accounts_pb2.ListEndpointsRequest, context: Context
    ) -> accounts_pb2.ListEndpointsResponse:
        with db.purpose("accounts"), self._link.watching():
            await self._endpoints.load()
        views = self._endpoints.views(request.workspace_id or None)
        return accounts_pb2.ListEndpointsResponse(endpoints=[endpoint_pb(v) for v in views])

    async def GetEndpoint(
        self, request: accounts_pb2.GetEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        with db.purpose("accounts"), self._link.watching():
            return endpoint_pb(await self._endpoints.get(request.endpoint_id))

    async def ResizeEndpoint(
        self, request: accounts_pb2.ResizeEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        with db.purpose("accounts"), self._link.watching():
            return endpoint_pb(await self._endpoints.resize(request.endpoint_id, request.replicas))

    async def DeleteEndpoint(
        self, request: accounts_pb2.DeleteEndpointRequest, context: Context
    ) -> accounts_pb2.Endpoint:
        with db.purpose("accounts"), self._link.watching():
            return endpoint_pb(await self._endpoints.delete(request.endpoint_id))

    async def ListReservedCapacity(
        self, request: accounts_pb2.ListReservedCapacityRequest, context: Context
    ) -> accounts_pb2.ListReservedCapacityResponse:
        return capacity_pb(self._endpoints)


def _timestamp(at_ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(at_ms)
    return ts


def endpoint_pb(view: EndpointView) -> accounts_pb2.Endpoint:
    endpoint = view.endpoint
    message = accounts_pb2.Endpoint(
        id=endpoint.id,
        workspace_id=endpoint.workspace_id,
        name=endpoint.name,
        model=endpoint.model_id,
        offering=endpoint.offering_id,
        base_model=endpoint.base_model,
        replicas=endpoint.replicas,
        status=STATUSES[view.status],
        status_reason=view.reason,
        created=_timestamp(endpoint.created_ms),
        periods_billed=endpoint.period,
        charged_nano_usd=endpoint.charged_nano,
        held_nano_usd=view.held_nano,
        usd_per_replica_hour=view.usd_per_replica_hour,
        period_seconds=view.period_s,
        suspended_by=endpoint.suspended_by.value if endpoint.suspended_by else "",
    )
    if endpoint.period:
        message.paid_until.CopyFrom(_timestamp(endpoint.paid_until_ms))
    return message


def capacity_pb(endpoints: EndpointEngines) -> accounts_pb2.ListReservedCapacityResponse:
    """The offerings of the card with this core's capacity pool (a cluster's cores each have
    their own: an endpoint is rented from the pool of the core the call reaches)."""
    return accounts_pb2.ListReservedCapacityResponse(
        offerings=[
            accounts_pb2.ReservedCapacity(
                offering=offering_pb(offering), replicas_total=total, replicas_free=free
            )
            for offering, total, free in endpoints.capacity()
        ],
        period_seconds=endpoints.period_s,
    )


def offering_pb(offering: ReservedOffering) -> inference_pb2.ReservedOffering:
    return inference_pb2.ReservedOffering(
        id=offering.id,
        model=offering.model,
        gpus_per_replica=offering.gpus_per_replica,
        usd_per_replica_hour=offering.usd_per_replica_hour,
        minimum_hours=offering.minimum_hours,
    )
