"""Before the stream: datasets (generated or checked) and the base model θ0."""
from prefect import task

from chronomerge import stages
from tasks.cache import stage

# Cheap when done (digests and a store ref are checked), so it runs every time and is not cached.
prepare = task(name="prepare")(stages.run_prepare)
base = stage("base", ("benchmark.py", "train.py", "models.py", "checkpoints.py", "model_configs/*.json"))(
    stages.run_base
)
