"""The continual update's own stages, around the stream's: receive arriving data, version it, promote."""
from prefect import task

from chronomerge import arrivals
from tasks import tracking

receive = task(name="receive-arrivals")(arrivals.scan)
register = task(name="register-arrivals")(arrivals.register)
version_data = task(name="dvc-add-incoming")(arrivals.version_with_dvc)
register_promotion = task(name="register-promotion")(tracking.register_promotion)
