"""The canonical prompt model: one reading of every ``POST /prompt``, shared by the workflow
policy, isolation, placement and the queue quota; ComfyUI receives the proxy's serialisation
of it, never the client's bytes.

The API (small on purpose):

- :func:`proxy.request.prompt.read_prompt` ``(request, ctx) -> Submission``: the request's
  body read once (cached on ``ctx``), typed with the instances' ``/object_info`` when the
  principal is judged, refused in ComfyUI's 400 shape when malformed or ambiguous.
  :func:`proxy.request.prompt.forward_submission` after changing it.
- :class:`proxy.comfy.submission.Submission`: ``body`` (the envelope as parsed) and
  ``prompt``, a :class:`proxy.comfy.graph.Prompt`: ``nodes`` (id -> ``Node`` with
  ``class_type`` and ``inputs``: typed literals or ``Link``), ``resolve(value)`` (through
  primitive chains), ``reads_files(node, name)`` (from ``/object_info``), ``problems``.
- :mod:`proxy.comfy.json_body` (strict JSON), :mod:`proxy.comfy.schemas` (input specs
  from ``/object_info``), :mod:`proxy.comfy.names` (model/media vocabulary),
  :mod:`proxy.comfy.violations` (``Violation``, ``PromptRejected``).

Only :mod:`proxy.request.prompt` touches aiohttp and the app; the rest is pure and imports
nothing from ``policy``, ``isolation`` or ``upstream``, so all of them can import it.
"""
