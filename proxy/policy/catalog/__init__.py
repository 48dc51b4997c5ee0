"""The node catalog (``/object_info`` and model lists) cached per instance, filtered per role."""
