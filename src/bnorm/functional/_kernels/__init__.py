"""bnorm's kernel layer (being assembled): the thread pool lives in :mod:`.pool`."""

from .pool import num_threads, parallel_map, set_num_threads

__all__ = ["num_threads", "parallel_map", "set_num_threads"]
