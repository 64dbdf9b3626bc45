"""uplink package."""
