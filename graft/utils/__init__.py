"""Helpers every layer may use: files, runtime, text, versions. Imports nothing else from graft but errors."""
