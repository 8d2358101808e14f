from monovl.model.decoder import KVCache, Routing
from monovl.model.mono import MonoInternVL

__all__ = ["KVCache", "MonoInternVL", "Routing"]
