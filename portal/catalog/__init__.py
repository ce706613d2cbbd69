"""What can run: service kinds and the engines for each model format, resource tiers, models and their metadata, images,
the model inventory and downloads."""
