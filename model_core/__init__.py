"""Shared core: model spec from config.json, checkpoint layout and lazy reading, the FFN math both sides use."""
