"""The pure domain: no I/O, no clock of its own, nothing to mock."""
