"""Stage 5 of task t: score θ^O_t on every dataset and on the tasks seen so far."""
from chronomerge import stages
from tasks.cache import stage

evaluate = stage("eval", ("evaluate.py", "models.py", "benchmark.py", "data/*.py"))(stages.run_eval)
