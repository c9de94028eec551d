"""Frozen features: the cache, extraction, linear probes, leaderboards and advice."""
