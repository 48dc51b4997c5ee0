"""The webhook outbox: messages waiting for a (next) attempt, durable in Redis.

A message is added once per job (the job's end, found by whichever replica, enqueues it with
a marker in the same atomic step: a second finder adds nothing) and stays until a receiver
answered 2xx or its retry period ran out. Replicas claim due messages with a lease
(:mod:`proxy.jobs.leases`): each attempt is made by one replica; one that dies mid-attempt
leaves the message to be taken over when its lease ends (at least once, never lost while
Redis keeps its data). Without Redis the outbox is this process's memory (lost on restart).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson

from proxy.jobs.leases import DueSet


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    """``webhook-id``: the same for every attempt (receivers deduplicate on it)."""
    job: str
    url: str
    body: str
    first_at: float
    attempts: int = 0

    def dump(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def load(cls, raw: bytes) -> Message | None:
        try:
            return cls(**orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError):
            return None


class Outbox:
    def __init__(self, due: DueSet, *, marker_ttl: float) -> None:
        self.due = due
        self._marker_ttl = marker_ttl

    async def enqueue_once(self, message: Message, now: float) -> bool:
        """Add the job's message unless one was added for the job already."""
        return await self.due.add(
            message.id, message.dump(), now, once=message.job, once_ttl=self._marker_ttl
        )

    async def claim(self, now: float, lease: float, limit: int) -> list[tuple[Message, str]]:
        claimed: list[tuple[Message, str]] = []
        for item, raw, token in await self.due.claim(now, lease, limit):
            message = Message.load(raw)
            if message is None:  # unreadable (another version's?): dropped, not retried forever
                await self.due.finish(item, token)
                continue
            claimed.append((message, token))
        return claimed

    async def delivered(self, message: Message, token: str) -> bool:
        return await self.due.finish(message.id, token)

    async def retry(self, message: Message, token: str, due: float) -> bool:
        return await self.due.reschedule(message.id, token, due, message.dump())


__all__ = ["Message", "Outbox"]
