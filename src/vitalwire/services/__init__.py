"""Use cases combining the core, the bus and the store. Transports call these only."""
