"""``GET /metrics``: the server's counters and state in Prometheus' text format (prometheus_client), read
from the scheduler and the service at each scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llava_gguf.server.service import ChatService

PREFIX = "llava_gguf_"


class ServiceCollector(Collector):
    def __init__(self, service: ChatService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        stats = self.service.scheduler.stats
        requests = CounterMetricFamily(f"{PREFIX}requests", "Chat completion requests that ended, by outcome",
                                       labels=["outcome"])
        requests.add_metric(["finished"], stats.finished)
        requests.add_metric(["cancelled"], stats.cancelled)
        requests.add_metric(["failed"], stats.failed)
        yield requests
        yield CounterMetricFamily(f"{PREFIX}requests_rejected", "Requests refused with 429 (queue full)",
                                  value=self.service.rejected)
        yield GaugeMetricFamily(f"{PREFIX}requests_waiting", "Requests waiting for a sequence (the queue's depth)",
                                value=stats.waiting)
        yield GaugeMetricFamily(f"{PREFIX}sequences_active", "Sequences answering a request", value=stats.active)
        yield GaugeMetricFamily(f"{PREFIX}sequences", "Sequences answered together (--parallel)", value=stats.n_seq)
        yield GaugeMetricFamily(f"{PREFIX}pool_positions", "Positions of the KV cache the sequences share",
                                value=stats.pool_positions)
        yield CounterMetricFamily(f"{PREFIX}prompt_tokens", "Prompt positions of the requests answered (image "
                                                            "positions included)", value=stats.prompt_tokens)
        yield CounterMetricFamily(f"{PREFIX}prompt_tokens_decoded", "Prompt positions decoded (the others were "
                                                                    "reused from a sequence or the prompt cache)",
                                  value=stats.prompt_tokens_decoded)
        yield CounterMetricFamily(f"{PREFIX}generated_tokens", "Tokens generated", value=stats.generated_tokens)
        yield GaugeMetricFamily(f"{PREFIX}generated_tokens_per_second", "Tokens generated per second of decoding, "
                                "all sequences together (since start)",
                                value=stats.generated_tokens / stats.decode_s if stats.decode_s else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}prompt_tokens_per_second", "Prompt positions decoded per second of "
                                "prefill (since start)",
                                value=stats.prompt_tokens_decoded / stats.prefill_s if stats.prefill_s else 0.0)
        yield CounterMetricFamily(f"{PREFIX}image_preparation_seconds", "Time spent getting images' features "
                                  "(encoding, or the feature cache)", value=stats.images_prepared_s)


def registry_for(service: ChatService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
