"""Settings and logging: the one place callflow reads its environment."""
