"""Use cases that combine the core, the bus and the store. Transports call these and nothing else."""
