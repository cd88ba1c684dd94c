"""Prefect tasks: one thin wrapper per stage of `chronomerge.stages`, cached by content.

`cache.stage` turns a core stage function into a Prefect task whose cache key is the SHA-256 of
the stage's name, its code version and its inputs (config slice, checkpoint ids, data digests),
with the result persisted as JSON under PREFECT_HOME. `tracking` is the one module that talks to MLflow.
"""
import os
from pathlib import Path

# Prefect runs locally under the project (never Cloud): its home, database and persisted results
# live in ./.prefect; a temporary API server starts on demand. Set before Prefect is imported.
for _key, _value in {
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Flow and task logs reach the Prefect API (the UI shows them); the command line keeps the console
    # quiet (flows/cli.py sets the console handler's level) and prints its own progress lines.
    "PREFECT_LOGGING_LEVEL": "INFO",
}.items():
    os.environ.setdefault(_key, _value)
# Every result record Prefect writes (a flow's too, a failure's exception too) is JSON: nothing this
# project writes is a pickle, and `cache.refuse_unsafe_records` refuses any record that is.
os.environ["PREFECT_RESULTS_DEFAULT_SERIALIZER"] = "json"
