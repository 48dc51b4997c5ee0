"""The jobs API for programs (``/comfygate/v1/``): templates, jobs, events, result cache."""
