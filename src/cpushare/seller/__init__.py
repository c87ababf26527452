"""The seller core: sell one CPU to the market under one sell order.

`Seller` is transport-agnostic (no D-Bus, no systemd): `cpushare.daemon`
adapts it to a system service, ``python -m cpushare.seller FILE.cpu`` runs
it in the foreground for development and tests.
"""

from .cache import CacheError, ImageCache
from .core import STATES, Seller, Status

__all__ = ["Seller", "Status", "STATES", "ImageCache", "CacheError"]
