"""The request read once: bodies within their budgets, the ``POST /prompt`` submission."""
