"""laser_core: gradient-guided low-rank reduction of language-model weights ("Compress to Impress")."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Edit, ModelSpec, SearchConfig, TaskSpec  # noqa: E402
from .errors import (Cancelled, ConfigError, JobBusy, LaserError, ModelLoadError,  # noqa: E402
                     NumericsError, OutOfMemory, TaskFormatError)
from .evaluate import CancelToken, evaluate  # noqa: E402
from .matrices import locate_matrices  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .reduction import block_svd, block_truncate, edited  # noqa: E402
from .search import run_search  # noqa: E402
from .store import Store  # noqa: E402
from .tasks import load_task, make_splits  # noqa: E402

__all__ = ["Edit", "ModelSpec", "SearchConfig", "TaskSpec", "Cancelled", "ConfigError", "JobBusy", "LaserError",
           "ModelLoadError", "NumericsError", "OutOfMemory", "TaskFormatError", "CancelToken", "evaluate", "LoadedModel",
           "load_model", "locate_matrices", "block_svd", "block_truncate", "edited", "run_search", "Store",
           "load_task", "make_splits"]
