"""Stage 1 of task t: the initialization θ^I_t (TIME's init axis)."""
from chronomerge import stages
from tasks.cache import stage

init = stage("init", ("strategies.py", "merge/*.py"))(stages.run_init)
