"""Browser tests: the stock ComfyUI frontend in headless Chromium, through the proxy."""
