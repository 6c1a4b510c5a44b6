"""artquant: the ArtQuant aesthetic scorer for AI-generated and artistic images.

Importing this package is cheap (no torch, no model): the public names load on first use. ComfyUI calls
`comfy_entrypoint` (its V3 node interface) when the folder sits in `ComfyUI/custom_nodes/`.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "ArtQuantScorer": ".scorer",
    "CheckpointError": ".scorer",
    "ImageInputError": ".scorer",
    "ImageScore": ".scorer",
    "LevelScores": ".scorer",
    "PRESETS": ".scorer",
    "Preset": ".scorer",
    # Called by ComfyUI when this folder sits in custom_nodes/; resolved on first access, so `import artquant` stays
    # cheap. The only ComfyUI export: ComfyUI prefers NODE_CLASS_MAPPINGS (V1) over it when a module has both.
    "comfy_entrypoint": ".artquant_nodes",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
