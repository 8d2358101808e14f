from monovl.model.kv_cache import KVCache
from monovl.model.mono import MonoInternVL
from monovl.model.routing import Routing

__all__ = ["KVCache", "MonoInternVL", "Routing"]
