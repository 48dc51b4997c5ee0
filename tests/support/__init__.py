"""Helpers shared by the test modules: graphs and images (``graphs``), users files
(``users``), proxies and stores over memory or Redis (``backends``), WebSocket reading
(``ws``) and the process environment (``env``). One copy each, instead of one per module."""
