"""Losses, one module per objective. See docs/ARCHITECTURE.md for the Objective protocol."""
