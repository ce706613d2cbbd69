"""What can run: service kinds and their runtimes (tiers, models and images join here)."""
