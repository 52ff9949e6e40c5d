"""lowc: compress transformers to V:N:M-sparse, low-bit artifacts and run them.

Public API: `compress`, `load`, `Recipe`; the `lowc` command mirrors it.
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import lowc` light: torch-heavy modules load on first use
    if name == "compress":
        from .compress.pipeline import compress
        return compress
    if name == "load":
        from .runtime.load import load
        return load
    if name == "Recipe":
        from .recipe import Recipe
        return Recipe
    raise AttributeError(f"module 'lowc' has no attribute {name!r}")


__all__ = ["compress", "load", "Recipe", "__version__"]
