"""Master-side state and clients: registry, enrollment, agent/updater clients, rollouts."""
