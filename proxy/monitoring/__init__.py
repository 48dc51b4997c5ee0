"""Watching the running proxy: the ``/metrics`` endpoint, the upstream probe, generation
tracking, and their wiring (above the request context and the transport they read; the
counters themselves are ``proxy.observability.metrics``, below everything)."""
