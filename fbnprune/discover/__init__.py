"""Discover stage (ICA functional networks)."""
