"""Store layer: manifest, Parquet mask/image stores, Zarr feature store, RLE codec, commit protocol.

Never imports torch: analysts and the pipeline's CPU workers use it without a deep-learning stack.
"""

from loftup.storage import errors
from loftup.storage.commit import ERROR_SCHEMA
from loftup.storage.errors import LoftupError, ShardSpecError, StoreError, WeightsError
from loftup.storage.features import FeatureStore
from loftup.storage.images import IMAGE_SCHEMA, image_schema
from loftup.storage.manifest import SCHEMA_VERSION
from loftup.storage.masks import MASK_SCHEMA, mask_schema
from loftup.storage.store import Store, open_store

__all__ = [
    "open_store",
    "Store",
    "FeatureStore",
    "MASK_SCHEMA",
    "IMAGE_SCHEMA",
    "ERROR_SCHEMA",
    "SCHEMA_VERSION",
    "mask_schema",
    "image_schema",
    "errors",
    "LoftupError",
    "StoreError",
    "ShardSpecError",
    "WeightsError",
]
