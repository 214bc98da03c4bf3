"""Missed-call email delivery tasks (see issue: missed-call emails)."""
