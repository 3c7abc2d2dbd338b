"""The minibus client library and the busctl command (they arrive with the broker)."""
