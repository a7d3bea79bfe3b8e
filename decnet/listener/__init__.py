"""DECNET listener."""
