"""``vitalwire bench``: load generators, reference servers and reports (not needed to run
the server)."""
