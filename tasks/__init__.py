"""Prefect tasks: thin wrappers that turn content hashes into cache keys and call one core function
(init, train, store, deploy, evaluate). They arrive with the pipeline."""
