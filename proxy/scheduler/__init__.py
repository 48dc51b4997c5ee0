"""The gateway queue: comfygate holds submitted prompts and feeds each ComfyUI instance only
when it has room, choosing the next prompt by weighted fair queueing across users
(``docs/scheduler.md``)."""
