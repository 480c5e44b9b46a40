"""What every route handler needs: the node, the settings, admission."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quart import Response, request

from exo_trio.api.admission import Admission
from exo_trio.api.errors import ApiError
from exo_trio.api.generation import Completion, check_available, complete, streaming_response
from exo_trio.api.settings import ApiSettings
from exo_trio.api.stream_response import StreamEncoder, stream_response
from exo_trio.api.timeouts import RequestTimeouts
from exo_trio.node import Node
from exo_trio.publisher import Publisher
from exo_trio.types import TextGeneration

if TYPE_CHECKING:
    from exo_trio.cluster import Cluster


@dataclass
class ApiContext:
    node: Node
    settings: ApiSettings
    admission: Admission
    # Membership and placement (/v1/instances, /state); None in unit tests of a lone Node.
    cluster: Cluster | None = None
    # Wakes the event streams (GET /v1/events) when the node's state changes.
    events: Publisher = field(default_factory=Publisher)

    @property
    def keepalive(self) -> float:
        return self.settings.keepalive_interval

    @property
    def timeouts(self) -> RequestTimeouts:
        return self.settings.timeouts

    async def body(self) -> bytes:
        """The raw request body (413 past --max-body-bytes, via MAX_CONTENT_LENGTH)."""
        return await request.get_data(cache=False)

    def begin(self, command: TextGeneration) -> None:
        """After a request validated: refuse it if no runner is ready (503) or the
        node is at capacity (429), else hold an admission slot for this exchange.
        Nothing is registered or dispatched yet; that happens in `events`."""
        check_available(self.node, command.model)
        if command.client_id is not None and self.node.client_id_in_use(command.client_id):
            raise ApiError(
                409,
                f"A request with X-Request-Id `{command.client_id}` is already in flight.",
                param="X-Request-Id",
                code="duplicate_request_id",
            )
        self.admission.admit()

    def stream(
        self,
        command: TextGeneration,
        encoder: StreamEncoder,
        content_type: str = "text/event-stream",
        keepalive: bool = True,
    ) -> Response:
        """A streaming response relaying the request's events through `encoder`."""
        interval = self.keepalive if keepalive else None
        return streaming_response(
            stream_response(self.node, command, encoder, interval, self.timeouts),
            command,
            content_type,
        )

    async def complete(self, command: TextGeneration) -> Completion:
        """Run a request to its end for a non-streaming response (with the limits)."""
        return await complete(self.node, command, self.timeouts)
