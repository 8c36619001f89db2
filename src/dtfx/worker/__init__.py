"""Workers: registries, dispatchers and the processing of work items."""
