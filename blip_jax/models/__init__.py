"""Flax NNX models of the BLIP family."""
