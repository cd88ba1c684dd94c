"""Prefect flows: `stream` (one temporal run), and the command line that drives them (`cli`)."""
import tasks  # noqa: F401  (sets Prefect's environment defaults before Prefect is imported)
