"""DECNET swarm plane: one master enrolls, commands, updates and collects logs from many workers."""

__version__ = "0.1.0"
