"""Seeded sample audio and images (tones, noise, gradients) for tests, benchmarks and the default prompts."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

RATE = 16000  # the thinker's feature extractor's rate


def write_wav(path: str | Path, samples: np.ndarray, rate: int = RATE, width: int = 2, channels: int = 1) -> Path:
    """samples in [-1, 1] as PCM of `width` bytes (1: unsigned 8-bit, 2 or 4: signed)."""
    path = Path(path)
    data = np.clip(np.repeat(samples[:, None], channels, axis=1), -1, 1)
    if width == 1:
        raw = (data * 127 + 128).astype(np.uint8)
    else:
        kind = np.int16 if width == 2 else np.int32
        raw = (data * np.iinfo(kind).max).astype(kind)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw.tobytes())
    return path


def tone(seconds: float, hz: float = 440.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def noise(seconds: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def gradient(height: int, width: int) -> np.ndarray:
    """RGB uint8: red across, green down, blue along the diagonal."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, width)[None, :]
    img[..., 1] = np.linspace(0, 255, height)[:, None]
    img[..., 2] = (img[..., 0].astype(int) + img[..., 1]) // 2
    return img


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_image(path: str | Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(pixels).save(path)  # the suffix picks PNG or JPEG
    return Path(path)
