"""DECNET updater."""
