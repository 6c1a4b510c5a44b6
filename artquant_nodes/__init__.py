"""ComfyUI nodes for ArtQuant: load a scorer once, then score, rank, filter, describe and annotate images.

Importable without ComfyUI (the nodes are plain classes); inside ComfyUI it also registers models/artquant/.
"""

from .model_handle import register_model_folder
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
