"""Stand-ins for hosted services, speaking their real wire protocols (see each module's docstring)."""
