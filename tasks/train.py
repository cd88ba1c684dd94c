"""Stage 2 of task t: fine-tune θ^I_t into the expert θ^S_t (plus its AdamW second moments), or import
an expert trained elsewhere."""
from chronomerge import stages
from tasks.cache import stage

train = stage("train", ("train.py", "experts.py", "models.py", "checkpoints.py", "benchmark.py", "data/*.py"))(
    stages.run_train
)
