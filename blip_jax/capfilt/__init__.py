"""CapFilt (BLIP's Captioning and Filtering): bootstrap a caption dataset from images and their
noisy ("web") texts.

    python -m blip_jax.capfilt --captioner runs/default/model --filter runs/default/model \\
        --data synthetic_scenes/small --out runs/capfilt --corrupt-fraction 0.3 --copy-split validation

For every image of `--split` of `--data`, the captioner samples `--num-captions` captions with the
originals' nucleus settings (prompt 'a picture of ', top-p 0.9, repetition penalty 1.1, 5 to 30
tokens with the prompt); the filter's ITM head scores the image's web texts and the synthetic
captions (the softmax of the ITM logits at index 1, "match"), and the pairs scoring at least
`--threshold` (default 0.5: the originals keep the ITM argmax "match") are kept.

`--data` is a dataset the project builds (`synthetic_scenes/<size>`, `coco_captions`) or a caption
annotation JSON (BLIP's format, with `--image-root`; built once into OUT/source_tfds, whose record
order is TFDS's, not the file's); each record's captions are its web texts.
`--corrupt-fraction F` simulates noisy web text: F of all web texts (chosen with `--seed`) are
replaced by a caption of another image, and the summary reports how well the filter finds them.

Output in OUT:
  annotations.json   the kept pairs in BLIP's caption annotation format, one entry per caption:
                     {image, caption, image_id, source: web | synthetic, itm_score[, corrupted]}
                     (the `blip_annotations` builder reads it; configs/pretrain_capfilt.py trains on it)
  images/<split>/    the images, as stored in the dataset (PNG for generated data, JPEG stays JPEG)
  <split>.json       with --copy-split: that split unfiltered (e.g. to evaluate a pretraining run)
  vocab.txt          the captioner's vocabulary (the pretraining run's tokenizer)
  parts/             every scored candidate, in chunks: part-PPPPP-CCCCC.jsonl (process, chunk)
  settings.json, summary.json

Sharding and resuming work like training: the images go in global batches over the mesh's data
axis (every device of every process; each process loads and writes only its rows, `jax.process_index`),
and one jitted function per batch samples the captions and scores them. Every chunk of
`--chunk-batches` batches is written atomically (temporary file, then rename) with its own random
key (`fold_in(key(seed), chunk)`, then the batch within the chunk), so a killed run continues with
the chunks it lacks and ends with the output an uninterrupted run writes. The threshold is applied
when the parts are gathered, so rerunning with another `--threshold` only rewrites the output.
"""

from blip_jax.capfilt.run import main, run  # noqa: E402

__all__ = ['main', 'run']
