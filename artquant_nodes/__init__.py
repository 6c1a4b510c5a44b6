"""ComfyUI nodes for ArtQuant: load a scorer, then score, rank, filter, describe, annotate, and guide sampling.

Importing this package never imports ComfyUI: the V3 node classes (nodes.py) load only when ComfyUI calls
`comfy_entrypoint`. The node logic lives below them, in operations.py, guidance.py and model_handle.py.
"""


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: registers models/artquant/ and returns the extension with every ArtQuant node."""
    from .nodes import ArtQuantExtension, register_model_folder

    register_model_folder()
    return ArtQuantExtension()


__all__ = ["comfy_entrypoint"]
