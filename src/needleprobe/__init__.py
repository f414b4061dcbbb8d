"""needleprobe: token-level linear probes on language-model activations.

Two stages: ``extract`` runs the model once into a Zarr cache; ``fit`` trains
probes from the cache as often as you like.  Importing this package does not
import transformers, so fitting works where only the cache is available.
"""

__version__ = "0.1.0"

import os as _os

# MKL may otherwise use fewer threads than asked when it judges the machine busy, and the split of a float
# reduction follows the thread count: fixing it keeps a run's numbers independent of the machine's load.
# Only effective before torch first calls MKL; the user's own setting wins.
_os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from .cache.cache import Cache, open_cache  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .errors import NeedleprobeError  # noqa: E402
from .run.layout import Layout  # noqa: E402
from .fit.probe import LinearProbe, load_probes  # noqa: E402

__all__ = ["Cache", "Config", "Layout", "LinearProbe", "NeedleprobeError", "load_config", "load_probes", "open_cache",
           "__version__"]
