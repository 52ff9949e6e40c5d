"""lowc: compress transformers to V:N:M-sparse, low-bit artifacts and run them.

Public API: `compress`, `load`, `export`, `Recipe`; the `lowc` command mirrors it.
"""

__version__ = "0.1.0"

# `compress` and `export` are also the names of subpackages: importing the function here binds the public name
# to the function once and for all (later submodule imports do not rebind it).
from .compress.pipeline import compress  # noqa: E402
from .export import export  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .runtime.load import load  # noqa: E402

__all__ = ["compress", "load", "export", "Recipe", "__version__"]
