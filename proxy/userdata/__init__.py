"""Per-user saved workflows, settings and ``user.css`` whatever ComfyUI's ``--multi-user`` flag."""
