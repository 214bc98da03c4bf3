"""Test support: the private services a test run starts, and small helpers."""
