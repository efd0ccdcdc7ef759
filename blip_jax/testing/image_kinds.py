"""Image files of the kinds users feed (grey, RGBA, palette, CMYK, 16-bit, EXIF-rotated, JPEG),
each with the RGB pixels `blip_jax.data.image_files` documents for it. The expected pixels come
from the arrays the files were written from, or from PIL's `convert('RGB')` where the rule is
"as the originals read it" (CMYK, JPEG), never from blip_jax's own reader."""

from __future__ import annotations

import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

H, W = 12, 20  # not square: a rotation would show in the shape


def png16(path: pathlib.Path, array: np.ndarray) -> None:
  """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]) written by hand: PIL cannot write 16-bit RGB."""
  array = array.reshape(array.shape[0], array.shape[1], -1)
  h, w, c = array.shape
  raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(h))

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)

  header = struct.pack('>IIBBBBB', w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
                   + chunk(b'IEND', b''))


def _pil_rgb(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def write(folder) -> dict[str, tuple[pathlib.Path, np.ndarray]]:
  """{name: (file, expected RGB uint8 pixels)} for one file of each kind, written into `folder`."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rs = np.random.RandomState(0)
  rgb = rs.randint(0, 256, (H, W, 3)).astype(np.uint8)
  grey = rs.randint(0, 256, (H, W)).astype(np.uint8)
  rgba = rs.randint(0, 256, (H, W, 4)).astype(np.uint8)
  grey16 = rs.randint(0, 65536, (H, W)).astype(np.uint16)
  rgb16 = rs.randint(0, 65536, (H, W, 3)).astype(np.uint16)
  palette = rs.randint(0, 256, (256, 3)).astype(np.uint8)
  indices = rs.randint(0, 256, (H, W)).astype(np.uint8)
  out = {}

  def kind(name, expected, save):
    path = folder / name
    save(path)
    out[name] = path, expected(path) if callable(expected) else expected

  kind('rgb.png', rgb, lambda p: Image.fromarray(rgb).save(p))
  kind('grey.png', np.repeat(grey[..., None], 3, -1), lambda p: Image.fromarray(grey).save(p))
  kind('rgba.png', rgba[..., :3], lambda p: Image.fromarray(rgba, 'RGBA').save(p))  # alpha dropped, not blended
  kind('grey_alpha.png', np.repeat(rgba[..., :1], 3, -1), lambda p: Image.fromarray(rgba[..., :2], 'LA').save(p))

  def save_palette(p):
    im = Image.fromarray(indices, 'P')
    im.putpalette(palette.flatten().tolist())
    im.save(p)

  kind('palette.png', palette[indices], save_palette)
  kind('grey16.png', np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1), lambda p: png16(p, grey16))
  kind('rgb16.png', (rgb16 >> 8).astype(np.uint8), lambda p: png16(p, rgb16))
  kind('photo.jpg', _pil_rgb, lambda p: Image.fromarray(rgb).save(p, quality=90))
  kind('grey.jpg', _pil_rgb, lambda p: Image.fromarray(grey).save(p, quality=90))
  kind('cmyk.jpg', _pil_rgb, lambda p: Image.fromarray(rgb).convert('CMYK').save(p, quality=95))

  def save_rotated(p):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(p, quality=90, exif=exif)

  kind('exif_rotated.jpg', _pil_rgb, save_rotated)  # pixels as stored: H x W, not turned
  return out
