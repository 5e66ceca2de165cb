"""Thin adapters: decode, call a service, encode. No clinical rule lives here."""
