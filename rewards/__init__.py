"""Rewards and potentials (installed as ``steerkit.rewards``)."""
