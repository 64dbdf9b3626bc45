"""plc package."""
