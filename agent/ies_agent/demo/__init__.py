"""``ies-agent demo``: a complete simulated site in one process, no hardware."""
