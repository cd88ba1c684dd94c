"""Stage 4 of task t: the deployed model θ^O_t (TIME's deploy axis)."""
from chronomerge import stages
from tasks.cache import stage

deploy = stage("deploy", ("strategies.py", "merge/*.py"))(stages.run_deploy)
