"""Audio and image files a prompt names: checked at plan time from their headers (a missing or unreadable
file, a wrong sample rate, more than one channel: one line), read at run time. Nothing is resampled,
mixed down or cut. No torch here: planning imports it.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from .checkpoint.processor import SAMPLING_RATE
from .errors import InputError

AUDIO_SUFFIXES, IMAGE_SUFFIXES = (".wav", ".flac"), (".png", ".jpg", ".jpeg")


def audio_header(path: str | Path) -> tuple[int, int, int]:
    """(sample rate, channels, frames) from the file's header; one line if it is missing or unreadable."""
    path = Path(path)
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise InputError(f"audio file {path}: not a .wav or .flac file")
    if not path.is_file():
        raise InputError(f"audio file {path} does not exist")
    try:
        if path.suffix.lower() == ".wav":
            with wave.open(str(path), "rb") as f:
                return f.getframerate(), f.getnchannels(), f.getnframes()
        import soundfile

        info = soundfile.info(str(path))
        return info.samplerate, info.channels, info.frames
    except ImportError:
        raise InputError(f"audio file {path}: reading flac needs the soundfile package (pip install soundfile)") from None
    except (wave.Error, EOFError, RuntimeError, OSError) as err:
        raise InputError(f"audio file {path} cannot be read ({str(err).strip() or type(err).__name__})") from None


def check_audio(path: str | Path) -> None:
    rate, channels, frames = audio_header(path)
    if rate != SAMPLING_RATE:
        raise InputError(f"audio file {path}: sample rate {rate} Hz, the model's feature extractor takes "
                         f"{SAMPLING_RATE} Hz (resample it first; nothing is resampled here)")
    if channels != 1:
        raise InputError(f"audio file {path}: {channels} channels, the model takes mono (mix it down first)")
    if frames == 0:
        raise InputError(f"audio file {path} holds no samples")


def read_audio(path: str | Path) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at SAMPLING_RATE (checked first)."""
    check_audio(path)
    path = Path(path)
    if path.suffix.lower() == ".flac":
        import soundfile

        return soundfile.read(str(path), dtype="float32")[0]
    with wave.open(str(path), "rb") as f:
        width, raw = f.getsampwidth(), f.readframes(f.getnframes())
    if width == 1:  # 8-bit wav is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    if width not in (2, 4):
        raise InputError(f"audio file {path}: {8 * width}-bit samples; 8-, 16- or 32-bit PCM wav only")
    kind = np.int16 if width == 2 else np.int32
    return np.frombuffer(raw, kind).astype(np.float32) / -np.iinfo(kind).min


def check_image(path: str | Path) -> None:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"image file {path}: not a .png or .jpeg file")
    if not path.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            img.verify()
            if img.format not in ("PNG", "JPEG"):
                raise InputError(f"image file {path} is {img.format}, not PNG or JPEG")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(f"image file {path} cannot be read ({str(err).strip() or type(err).__name__})") from None


def read_image(path: str | Path):
    from PIL import Image

    check_image(path)
    with Image.open(path) as img:
        return img.convert("RGB")


def prompt_token_bound(prompt, pixels_per_token: int = 32) -> int:
    """At least the tokens a prompt takes, for sizing memory at plan time: a byte-level tokenizer makes at
    most one token per byte of text; audio takes the towers' 13 tokens per 100 mel frames (10 ms each) and
    a few; an image at most one token per pixels_per_token-square tile, rounded up (Qwen3-Omni: 16-pixel
    patches merged 2 x 2), before any downscaling to the processor's max_pixels; two markers per item."""
    if isinstance(prompt, str):
        return len(prompt.encode())
    from PIL import Image

    tokens = len(prompt["text"].encode())
    for path in prompt["audio"]:
        frames = audio_header(path)[2] // 160 + 1
        tokens += (frames // 100) * 13 + 13 + 2
    for path in prompt["image"]:
        with Image.open(path) as img:
            width, height = img.size
        tokens += -(-width // pixels_per_token) * -(-height // pixels_per_token) + 2
    return tokens
