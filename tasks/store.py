"""Stage 3 of task t: verify θ^S_t and add it to the storage S."""
from chronomerge import stages
from tasks.cache import stage

store = stage("store", ("store.py", "statedict.py"))(stages.run_store)
