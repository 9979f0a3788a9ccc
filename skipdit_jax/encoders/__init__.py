"""Encoders and decoders around the denoiser: the SD VAE (`vae`)."""
