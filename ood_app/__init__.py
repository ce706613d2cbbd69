"""The bridge from an Open OnDemand job to the portal: launch, the connection file, helpers for the ERB files."""
