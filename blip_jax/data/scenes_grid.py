"""`python -m blip_jax.data.scenes_grid --out grid.png`: build synthetic_scenes (if needed) and
write a PNG grid of sample images with their first captions.

(A separate module: run as `python -m`, the builder's own module would register the dataset
twice.)
"""

from blip_jax.data.datasets import FILE_FORMAT
from blip_jax.data.synthetic_scenes import SyntheticScenes, sample_grid


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description='Build synthetic_scenes and write a sample grid.')
  parser.add_argument('--out', default='synthetic_scenes.png', help='PNG file to write')
  parser.add_argument('--config', default='small', choices=[c.name for c in SyntheticScenes.BUILDER_CONFIGS])
  parser.add_argument('--data_dir', default=None, help='TFDS data directory (default: ~/tensorflow_datasets)')
  parser.add_argument('--count', type=int, default=12)
  args = parser.parse_args(argv)
  builder = SyntheticScenes(config=args.config, data_dir=args.data_dir, file_format=FILE_FORMAT)
  builder.download_and_prepare()
  source = builder.as_data_source('train')
  sample_grid(source.__getitems__(list(range(args.count)))).save(args.out)
  print(f'wrote {args.out} ({args.count} {args.config} scenes from {builder.data_dir})')


if __name__ == '__main__':
  main()
