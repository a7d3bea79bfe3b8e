"""The built-in engine's decoy services, one module per service type."""
