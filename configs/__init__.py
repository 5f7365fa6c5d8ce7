"""YAML recipes shipped with mscn (demo, SimCLR/BYOL ResNet-50 on ImageNet-1k)."""
