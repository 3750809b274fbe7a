"""Backplanes (``memory``, and a Redis one for clusters) and client transport adapters."""
