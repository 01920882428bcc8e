"""Photo-like 500x375 JPEG shards, made from the photographs bundled with scikit-image.

Nothing is downloaded: `skimage.data` ships astronaut, coffee, chelsea, cat,
rocket, hubble_deep_field, immunohistochemistry and retina. Every image is a
random crop of one of them, rescaled (so the crop shows 0.55-1.0 of the
photo's shorter side), maybe flipped, with a colour gain, a brightness and
contrast change and mild sensor noise, then encoded as JPEG (quality 90,
~45 kB like an ImageNet photo).
"""

from __future__ import annotations

import os

import numpy as np

PHOTO_HEIGHT, PHOTO_WIDTH = 375, 500
_SOURCES = ("astronaut", "coffee", "chelsea", "cat", "rocket", "hubble_deep_field", "immunohistochemistry",
            "retina")


def _sources() -> list[np.ndarray]:
    import skimage.data

    return [np.asarray(getattr(skimage.data, name)())[..., :3] for name in _SOURCES]


def photo_images(n: int, seed: int = 0) -> np.ndarray:
    """n uint8 images [n, 375, 500, 3]: augmented crops of real photographs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = _sources()
    out = np.empty((n, PHOTO_HEIGHT, PHOTO_WIDTH, 3), np.uint8)
    for i in range(n):
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        crop = rng.uniform(0.55, 1.0) * min(h, w * PHOTO_HEIGHT / PHOTO_WIDTH)
        ch, cw = int(crop), int(min(w, crop * PHOTO_WIDTH / PHOTO_HEIGHT))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop_image = Image.fromarray(np.ascontiguousarray(photo[y : y + ch, x : x + cw]))
        image = np.asarray(crop_image.resize((PHOTO_WIDTH, PHOTO_HEIGHT), Image.BILINEAR), np.float32)
        if rng.random() < 0.5:
            image = image[:, ::-1]
        gain = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.2)
        mean = image.mean()
        image = (image - mean) * rng.uniform(0.8, 1.2) + mean * gain
        image += rng.normal(0.0, 2.0, image.shape)
        out[i] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_photo_shards(folder: str, n: int, *, shards: int = 4, pool: int = 48, seed: int = 0) -> dict:
    """Writes n tf.train.Examples of photo-like JPEGs (labels 0..999) over `shards` files.

    Returns:
      {"pattern": glob, "images": n, "bytes_per_image": mean JPEG size, "size": "500x375"}.
    """
    from pipeline.demo import make_example
    from transforms.records import write_records

    os.makedirs(folder, exist_ok=True)
    encoded = [encode_jpeg(image) for image in photo_images(min(pool, n), seed=seed)]
    labels = np.random.default_rng(seed + 1).integers(0, 1000, n)
    per_shard: list[list[bytes]] = [[] for _ in range(shards)]
    for i in range(n):
        per_shard[i % shards].append(
            make_example(encoded[i % len(encoded)], label=int(labels[i]), image_id=f"photo-{i:06d}")
        )
    for s, records in enumerate(per_shard):
        write_records(os.path.join(folder, f"photos-{s:05d}-of-{shards:05d}.tfrecord"), records)
    return {
        "pattern": os.path.join(folder, "*.tfrecord"),
        "images": n,
        "bytes_per_image": float(np.mean([len(e) for e in encoded])),
        "size": f"{PHOTO_WIDTH}x{PHOTO_HEIGHT}",
    }
