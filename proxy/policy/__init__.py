"""Workflow policy: which nodes, models and input values each role may submit.

- :mod:`proxy.policy.model` - the compiled policy (:class:`RolePolicy`) read on the request path.
- :mod:`proxy.policy.bounds` - the input-bound rule language (``steps <= 60``).
- :mod:`proxy.policy.loader` - TOML policy files -> compiled rules, with every error at once.
- :mod:`proxy.policy.store` - :class:`PolicyStore` (``app[POLICY]``), swapped on reload.
- :mod:`proxy.policy.checker` - ``check_workflow``: a pure function, every violation at once.
- :mod:`proxy.policy.guard` - ``PolicyGuard`` on ``POST /prompt``.
- :mod:`proxy.policy.reload` - ``POST /admin/reload`` and SIGHUP.
"""
