"""Shared Redis infrastructure: the client, pipelined script calls, the circuit breaker."""
