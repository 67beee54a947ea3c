"""Models: the torchvision-layout ResNet family and the Barlow Twins twin model."""

from bt_jax.models.barlow import (
    BarlowTwins,
    Projector,
    barlow_twins,
    build_model,
    parse_projector,
)
from bt_jax.models.resnet import ARCHS, ResNet, resnet

__all__ = [
    "ARCHS",
    "BarlowTwins",
    "Projector",
    "ResNet",
    "barlow_twins",
    "build_model",
    "parse_projector",
    "resnet",
]
