"""Serving: the Engine API, continuous batching, the HTTP API, routing traces and live balancing."""
