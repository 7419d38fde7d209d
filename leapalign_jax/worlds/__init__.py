"""Embedded, offline worlds for end-to-end runs on a CPU."""
