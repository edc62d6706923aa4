"""Kairos decision API: slot answers from session state, always within the deadline."""
