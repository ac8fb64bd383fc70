"""Alerts: what a workspace's owner should hear about, shown as a banner and sent to a webhook.

An alert is in force while its condition holds: the balance is below the workspace's threshold,
the month's spend has reached 80% or 100% of the cap, or the last auto-reload failed. The
dashboard reads `active` (a pure function of the workspace). `Alerter.check` runs after every
change that can start one (a charge, a failed reload, a change of cap or settings) and sends a
webhook for each alert that has just come into force: a JSON POST signed with HMAC-SHA256 of
`<timestamp>.<body>` under the workspace's secret (header `Corvex-Signature: t=<unix s>,v1=<hex>`),
retried with exponential backoff. Unless configured otherwise, a URL whose host resolves to a
loopback, private, link-local or reserved address is refused, so a customer's webhook cannot
make the core call into its own network. What has been sent is kept in memory: after a restart an
alert still in force is sent again at the next change. Delivery never delays a request.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Final

import aiohttp
import msgspec

from corvex.money import format_usd
from corvex_core.ledger import Ledger
from corvex_core.state import Workspace

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "Corvex-Signature"
# Deliveries in flight at once, over every workspace; more are dropped (and logged).
MAX_IN_FLIGHT: Final = 256
_ERROR_CHARS: Final = 300


class AlertKind(enum.StrEnum):
    BALANCE_LOW = "balance_low"
    SPEND_CAP_80 = "spend_cap_80"
    SPEND_CAP_100 = "spend_cap_100"
    AUTO_RELOAD_FAILED = "auto_reload_failed"


class Alert(msgspec.Struct, frozen=True):
    kind: AlertKind
    message: str


class Delivery(msgspec.Struct, frozen=True):
    """The webhook's JSON body."""

    type: str
    workspace_id: str
    kind: AlertKind
    message: str
    created: int
    balance_usd: str
    month_spend_usd: str
    spend_cap_usd: str | None


def active(ws: Workspace) -> list[Alert]:
    """The alerts in force for this workspace now."""
    found = []
    below = ws.alerts.balance_below_nano
    if below is not None and ws.balance_nano < below:
        found.append(
            Alert(
                AlertKind.BALANCE_LOW,
                f"Balance ${format_usd(ws.balance_nano)} is below your alert threshold of "
                f"${format_usd(below)}.",
            )
        )
    cap = ws.spend_cap_nano
    if cap is not None:
        spent = ws.month_spend_nano
        if spent >= cap:
            found.append(
                Alert(
                    AlertKind.SPEND_CAP_100,
                    f"This month's spend (${format_usd(spent)}) has reached the spend cap of "
                    f"${format_usd(cap)}: requests are refused until the cap is raised or the "
                    "month ends.",
                )
            )
        elif spent * 10 >= cap * 8:
            found.append(
                Alert(
                    AlertKind.SPEND_CAP_80,
                    f"This month's spend (${format_usd(spent)}) has reached 80% of the spend cap "
                    f"of ${format_usd(cap)}.",
                )
            )
    if ws.auto_reload_error:
        found.append(
            Alert(AlertKind.AUTO_RELOAD_FAILED, f"Auto-reload failed: {ws.auto_reload_error}")
        )
    return found


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Corvex-Signature` header value of a delivery."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Alerter:
    """Sends each alert once when it comes into force. One per core."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        attempts: int,
        retry_initial_s: float,
        timeout_s: float,
        allow_private_addresses: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert attempts >= 1
        self._allow_private = allow_private_addresses
        self._ledger = ledger
        self._attempts = attempts
        self._retry_initial_s = retry_initial_s
        self._timeout_s = timeout_s
        self._clock = clock
        # workspace id → the alert kinds in force at its last check.
        self._in_force: dict[str, frozenset[AlertKind]] = {}
        self._last_error: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def last_error(self, workspace_id: str) -> str:
        return self._last_error.get(workspace_id, "")

    def check(self, workspace_id: str) -> None:
        """Synchronous and cheap: compares the alerts in force with the last check's."""
        ws = self._ledger.workspace(workspace_id)
        alerts = active(ws)
        kinds = frozenset(a.kind for a in alerts)
        before = self._in_force.get(workspace_id, frozenset())
        if kinds == before:
            return
        self._in_force[workspace_id] = kinds
        if not ws.alerts.webhook_url:
            return
        for alert in alerts:
            if alert.kind not in before:
                self.send(ws, alert)

    def send(self, ws: Workspace, alert: Alert) -> None:
        """Delivers one alert to the workspace's webhook, in the background, with retries."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            log.warning(
                "alert webhook of %s dropped: %d deliveries in flight", ws.id, MAX_IN_FLIGHT
            )
            return
        body = msgspec.json.encode(
            Delivery(
                type="corvex.alert",
                workspace_id=ws.id,
                kind=alert.kind,
                message=alert.message,
                created=int(self._clock()),
                balance_usd=format_usd(ws.balance_nano),
                month_spend_usd=format_usd(ws.month_spend_nano),
                spend_cap_usd=None if ws.spend_cap_nano is None else format_usd(ws.spend_cap_nano),
            )
        )
        task = asyncio.create_task(
            self._deliver(ws.id, ws.alerts.webhook_url, ws.alerts.webhook_secret, body),
            name=f"alert:{ws.id}:{alert.kind}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, workspace_id: str, url: str, secret: str, body: bytes) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s)
            )
        delay = self._retry_initial_s
        for attempt in range(1, self._attempts + 1):
            timestamp = int(self._clock())
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: signature(secret, timestamp, body),
                "User-Agent": "corvex-alerts/1",
            }
            try:
                await self._check_address(url)
                async with self._session.post(url, data=body, headers=headers) as response:
                    if response.status < 300:
                        self._record_error(workspace_id, "")
                        return
                    error = f"HTTP {response.status}"
            except _Refused as exc:
                self._record_error(workspace_id, str(exc))
                log.warning("alert webhook of %s refused: %s", workspace_id, exc)
                return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            error = f"{error[:_ERROR_CHARS]} (attempt {attempt} of {self._attempts})"
            self._record_error(workspace_id, error)
            # The URL is the customer's own; it is not logged (it may carry a token).
            log.warning("alert webhook of %s failed: %s", workspace_id, error)
            if attempt < self._attempts:
                await asyncio.sleep(delay)
                delay *= 2

    def _record_error(self, workspace_id: str, error: str) -> None:
        """The last delivery's error ("" once one succeeded), as `last_error` reads it."""
        if error:
            self._last_error[workspace_id] = error
        else:
            self._last_error.pop(workspace_id, None)

    async def _check_address(self, url: str) -> None:
        """Refuses a URL whose host is (or resolves to) an address of our own networks."""
        if self._allow_private:
            return
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, address in infos:
            ip = ipaddress.ip_address(address[0])
            if not ip.is_global:
                raise _Refused(
                    f"the webhook's host resolves to {ip}, a non-public address; deliveries go "
                    "to public addresses only"
                )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


class _Refused(Exception):
    """A webhook URL that is never delivered to (no retry)."""
