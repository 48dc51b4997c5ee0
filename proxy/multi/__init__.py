"""Several ComfyUI instances presented as one: dispatch, merged views, fan-in, placement,
sticky routing, the registry and discovery, lost prompts, replication, idempotency."""
