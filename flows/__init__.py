"""Prefect flows composing the tasks: stream.py (one temporal run), sweep.py, update.py.
They arrive with the pipeline."""
