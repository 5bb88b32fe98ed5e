"""Runnable examples: an ASGI app on the async pool, a WSGI app on the sync pool."""
