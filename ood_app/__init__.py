"""The bridge from an Open OnDemand job to the portal: the connection file notebooks read."""
