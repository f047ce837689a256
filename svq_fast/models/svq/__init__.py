"""The stage-1 sVQ model family: VQVAE / VQGAN (image), semantic VQVAE, and the coupled sVQVAE / sVQGAN."""

from .discriminator import PatchDiscriminator
from .model import SVQModel

__all__ = ["SVQModel", "PatchDiscriminator"]
