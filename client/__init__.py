"""artquant-client: call an `artquant serve` reward server from any environment (numpy + Pillow, no torch).

Installed on its own (`pip install ./client`) it is `artquant_client`; inside the main package, `artquant.client`.
"""

from .remote import RemoteReward, RemoteRewardError, images_to_uint8

__all__ = ["RemoteReward", "RemoteRewardError", "images_to_uint8"]
__version__ = "0.1.0"
