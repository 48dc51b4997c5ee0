"""Identity: who is calling (JWT bearer tokens, browser sessions) and what their role allows."""
