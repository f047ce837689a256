"""Stage-1 losses: reconstruction, semantic cross-entropy, hinge GAN and the adaptive GAN weight."""
