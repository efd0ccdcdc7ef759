"""Data layer: text cleaning and tokenization (`blip_jax.data.text`), the procedural
`synthetic_scenes` TFDS dataset (`blip_jax.data.synthetic_scenes`).

Nothing here is imported eagerly, so `import blip_jax.data.text` does not pull TensorFlow in.
"""
