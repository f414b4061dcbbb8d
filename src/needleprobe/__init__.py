"""needleprobe: token-level linear probes on language-model activations.

Two stages: ``extract`` runs the model once into a Zarr cache; ``fit`` trains
probes from the cache as often as you like.  Importing this package does not
import transformers, so fitting works where only the cache is available; nor does it
change any environment variable or process setting (the command line sets its own).
"""

__version__ = "0.1.0"

from .cache.reader import Cache, open_cache
from .config import Config, load_config
from .errors import NeedleprobeError
from .run.layout import Layout
from .fit.probe import LinearProbe
from .analysis.run import load_probes

__all__ = ["Cache", "Config", "Layout", "LinearProbe", "Monitor", "NeedleprobeError", "load_config", "load_probes",
           "open_cache", "__version__"]


def __getattr__(name: str):
    """``needleprobe.Monitor`` is imported on first use, so ``import needleprobe`` stays light."""
    if name == "Monitor":
        from .deploy.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'needleprobe' has no attribute {name!r}")
