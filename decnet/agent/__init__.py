"""DECNET agent."""
