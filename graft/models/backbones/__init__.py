"""The backbone registry and its sources (timm, torchvision, the lab's scratch networks)."""
