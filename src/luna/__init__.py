"""luna: end-to-end lung-nodule detection for chest CT (LUNA16 / LIDC-IDRI) on PyTorch."""

from luna.errors import LunaError

__version__ = "0.1.0"

__all__ = ["LunaError", "__version__"]
