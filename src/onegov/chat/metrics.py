"""Prometheus metrics of one ``onegov-chat serve`` process.

Each server has a registry of its own, served at ``/metrics`` on the
websocket port. Names follow the Prometheus conventions: a common
``onegov_chat_`` prefix, ``_total`` for counters, base units (seconds).

"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    """The counters, gauges and histograms of one server."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        self.connections = Gauge(
            'onegov_chat_connections',
            'Open websocket connections, by role.',
            ['role'], registry=registry,
        )
        self.handshakes = Counter(
            'onegov_chat_handshakes_total',
            'Websocket handshakes, by outcome and refusal reason.',
            ['outcome', 'reason'], registry=registry,
        )
        self.tokens_consumed = Counter(
            'onegov_chat_tokens_consumed_total',
            'One-time tokens that admitted a connection.',
            registry=registry,
        )
        self.tokens_expired = Counter(
            'onegov_chat_tokens_expired_total',
            'Tokens presented after their lifetime ran out.',
            registry=registry,
        )
        self.messages_received = Counter(
            'onegov_chat_messages_received_total',
            'Chat messages received from clients.',
            registry=registry,
        )
        self.messages_stored = Counter(
            'onegov_chat_messages_stored_total',
            'Chat messages stored (re-sent duplicates not counted).',
            registry=registry,
        )
        self.messages_delivered = Counter(
            'onegov_chat_messages_delivered_total',
            'Chat messages queued for delivery to a client.',
            registry=registry,
        )
        self.delivery_latency = Histogram(
            'onegov_chat_delivery_latency_seconds',
            'Time from receiving a message to handing it to its '
            'receivers on this replica.',
            buckets=(
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ),
            registry=registry,
        )
        self.rate_limited = Counter(
            'onegov_chat_rate_limited_total',
            'Frames refused by the per-connection rate limit.',
            registry=registry,
        )
        self.connections_refused = Counter(
            'onegov_chat_connections_refused_total',
            'Admitted connections closed at once, by reason.',
            ['reason'], registry=registry,
        )
        self.broker_publish = Histogram(
            'onegov_chat_broker_publish_seconds',
            'Time to publish one event to the broker (its lag).',
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0),
            registry=registry,
        )

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
