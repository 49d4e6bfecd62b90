"""EdgeMT: multi-task dense perception, compressed and exported for the edge."""

from edgemt.models import create_model, list_models, load_model, save_model
from edgemt.tasks import TASKS, Task, get_task, resolve_tasks

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "Task",
    "__version__",
    "create_model",
    "get_task",
    "list_models",
    "load_model",
    "resolve_tasks",
    "save_model",
]
