"""Sources -> a local file (being split into one module per concept)."""

from pl_pretrain.fetching.fetch import *  # noqa: F403
from pl_pretrain.fetching.fetch import __all__  # noqa: F401
