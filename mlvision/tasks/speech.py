"""The spoken tasks (issue 32): words synthesised by Debian's espeak-ng, turned into log-mel spectrogram images.

- spoken_digit: a digit 0-9 spoken in one of ten languages, labelled by its value (mnist's label space, heard);
- spoken_language: the very same images, labelled by the language (the "same images, other labelling" relation);
- spoken_rate: the very same images again, labelled by how fast they were spoken (slow 120-146, medium 147-173,
  fast 174-200 words a minute: the seeded speed each utterance was synthesised at);
- spoken_word: ten English command words (Speech Commands' yes, no, up, down, left, right, on, off, stop, go) in
  five English accents, labelled by the word (the same style as the other two, other labels);
- spoken_letter: the 26 letter names (ay, bee, see...) in three English accents, labelled by the letter (the
  label space of font_letters and font_lower, heard; the "E-set" b, c, d, e, g, p, t, v, z is the classic hard part).

Every utterance is spoken by one of espeak-ng's 101 voice variants (`voices/!v`) at a seeded speed (120-200 words
a minute) and pitch (20-80), and the variants are cut 60/20/20 into train/validation/test (seeded): no voice is in
two splits. Sizes: 61 / 20 / 20 variants; spoken_digit, spoken_language and spoken_rate 6,100 / 2,000 / 2,000 images
(10 languages x 10 digits a variant), spoken_word 3,050 / 1,000 / 1,000 (5 accents x 10 words), spoken_letter
4,758 / 1,560 / 1,560 (3 accents x 26 letters).

Image: the first second of the 22,050 Hz waveform, centred in a one-second window, short-time Fourier transform
(Hann window of 512 samples, hop 256), 64 triangular mel filters (HTK scale), power in dB clipped 80 dB below the
peak and scaled to 0-255, low frequencies at the bottom, resized to 64x64 grayscale. The mel filterbank is written
here (25 lines) because no library in requirements.txt has one (scipy has no mel scale; torchaudio and librosa
would be new, heavy dependencies for a fixed, standard formula).

espeak-ng is not installed: its pinned amd64 .debs (`sources.ESPEAK_DEBS`) are unpacked into the cache
(`espeak_root`) and the program is run from there with its own library and data paths.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import tempfile
import wave
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .. import sources
from ..errors import DataSourceError
from ..paths import cache_dir
from .splits import SEED, SPLITS, Splits, cut_units

LANGUAGES = {  # espeak-ng voice -> label name
    "en": "english",
    "de": "german",
    "fr": "french",
    "es": "spanish",
    "it": "italian",
    "pl": "polish",
    "ru": "russian",
    "tr": "turkish",
    "fi": "finnish",
    "hu": "hungarian",
}
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ENGLISH_ACCENTS = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbcwmd")
LETTER_ACCENTS = ENGLISH_ACCENTS[:3]
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")  # espeak-ng says a lone letter by its name
SAMPLE_RATE, N_FFT, HOP, N_MELS, SECONDS, DB_RANGE, IMAGE_SIZE = 22050, 512, 256, 64, 1.0, 80.0, 64
SPEED, PITCH = (120, 200), (20, 80)
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # of the voice variants
RATES = ("slow", "medium", "fast")  # SPEED cut into three equal ranges of 27 words a minute


def espeak_root() -> Path:
    """The folder the pinned espeak-ng .debs are unpacked into (once, atomically) and run from."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise DataSourceError(
            f"the spoken tasks run the pinned amd64 build of espeak-ng, and this machine is {platform.machine()}: "
            "prepare them on an x86-64 machine and copy the task cache, or leave the spoken tasks out"
        )
    version = sources.ESPEAK_DEBS["espeak-ng"]
    root = cache_dir() / "tools" / f"espeak-ng-{version}"
    if not (root / "usr" / "bin" / "espeak-ng").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".espeak-"))
        try:
            for package, pinned in sources.ESPEAK_DEBS.items():
                sources.extract_deb(sources.fetch_deb(package, pinned), staging)
            try:
                os.rename(staging, root)
            except OSError:
                if not root.exists():  # a concurrent preparation that won the race is fine
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _data_dir(root: Path) -> Path:
    return root / "usr" / "lib" / "x86_64-linux-gnu" / "espeak-ng-data"


def voice_variants(root: Path) -> list[str]:
    """espeak-ng's voice variants (file names in voices/!v), sorted."""
    return sorted(p.name for p in (_data_dir(root) / "voices" / "!v").iterdir() if p.is_file())


def synthesise(root: Path, voice: str, text: str, speed: int, pitch: int) -> np.ndarray:
    """The waveform (float32 in [-1, 1], SAMPLE_RATE Hz) of `text` spoken by espeak-ng voice `voice`."""
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(root / "usr" / "lib" / "x86_64-linux-gnu"),
        "ESPEAK_DATA_PATH": str(_data_dir(root)),
    }
    cmd = [str(root / "usr" / "bin" / "espeak-ng"), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataSourceError(f"espeak-ng could not run from {root} ({exc}): delete that folder and run again") from exc
    if proc.returncode != 0 or not proc.stdout:
        said = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise DataSourceError(f"espeak-ng failed on voice {voice!r} ({said[0]}): delete {root} and run again")
    with wave.open(io.BytesIO(proc.stdout)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2:
            raise DataSourceError(f"espeak-ng gave {w.getframerate()} Hz, {8 * w.getsampwidth()}-bit audio")
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """N_MELS triangular filters [N_MELS, N_FFT // 2 + 1], equally spaced on the HTK mel scale from 0 Hz to Nyquist."""
    mels = np.linspace(0.0, 2595.0 * np.log10(1.0 + SAMPLE_RATE / 2 / 700.0), N_MELS + 2)
    edges = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE)
    bank = np.zeros((N_MELS, len(bins)), np.float32)
    for i in range(N_MELS):
        lo, mid, hi = edges[i : i + 3]
        bank[i] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
    return bank


def log_mel_image(audio: np.ndarray) -> np.ndarray:
    """The IMAGE_SIZE x IMAGE_SIZE uint8 log-mel image of a waveform (see the module docstring)."""
    n = int(SAMPLE_RATE * SECONDS)
    audio = audio[:n]
    window = np.zeros(n, np.float32)
    start = (n - len(audio)) // 2
    window[start : start + len(audio)] = audio
    frames = np.lib.stride_tricks.sliding_window_view(window, N_FFT)[::HOP] * np.hanning(N_FFT)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    db = 10 * np.log10(np.maximum(mel_filterbank() @ power.T, 1e-10))
    db = np.clip(db, db.max() - DB_RANGE, None)
    scaled = (db - db.min()) / max(float(db.max() - db.min()), 1e-6) * 255
    image = Image.fromarray(scaled.astype(np.uint8)[::-1])  # low frequencies at the bottom
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def variant_split(variants: list[str]) -> dict[str, str]:
    """Voice variant -> split: the variants shuffled (seeded) and cut 60/20/20."""
    return cut_units(variants, SPLIT_FRACTIONS, [SEED, 32, 1])


def prosody(key: int) -> tuple[int, int]:
    """The seeded (speed, pitch) an utterance is spoken at: speed in words a minute, pitch 0-99 (espeak-ng's -s, -p)."""
    rng = np.random.default_rng([SEED, 32, key])
    return int(rng.integers(*SPEED, endpoint=True)), int(rng.integers(*PITCH, endpoint=True))


def rate_of(speed: int) -> int:
    """The index in RATES of a speed: SPEED's range cut into three equal parts."""
    return min(len(RATES) - 1, (speed - SPEED[0]) * len(RATES) // (SPEED[1] - SPEED[0] + 1))


def _utterances(items: list[tuple[str, str, str, int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, item indices)} for items (split, voice, text, seed key), each spoken at `prosody(key)`
    (espeak-ng processes run in parallel: they work outside the GIL) and shuffled within its split (seeded)."""
    root = espeak_root()

    def one(item: tuple[str, str, str, int]) -> np.ndarray:
        _, voice, text, key = item
        return log_mel_image(synthesise(root, voice, text, *prosody(key)))

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        images = list(pool.map(one, items))
    return {split: (np.stack([images[i] for i in idx]), idx) for split, idx in split_order(items).items()}


def split_order(items: list[tuple[str, str, str, int]]) -> dict[str, np.ndarray]:
    """{split: indices of `items`} in the order a task stores them: each split's items shuffled (seeded).

    Public so that a test can find where a given utterance lies and synthesise a few again, not all 10,000."""
    out = {}
    for s, split in enumerate(SPLITS):
        idx = np.array([i for i, item in enumerate(items) if item[0] == split])
        out[split] = idx[np.random.default_rng([SEED, 32, 97, s]).permutation(len(idx))]
    return out


def _key(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def _grid(what: str, accents: tuple[str, ...], texts: tuple[str, ...]):
    """Every voice variant x accent (or language) x text: the items (split, voice, text, seed key) to speak, and
    each item's text index and accent index (its labels)."""
    variants = voice_variants(espeak_root())
    split_of = variant_split(variants)
    grid = [(v, a, t) for v in variants for a in range(len(accents)) for t in range(len(texts))]
    items = [(split_of[v], f"{accents[a]}+{v}", texts[t], _key(what, v, accents[a], texts[t])) for v, a, t in grid]
    return items, np.array([t for *_, t in grid], np.int64), np.array([a for _, a, _ in grid], np.int64)


def digit_items() -> tuple[list[tuple[str, str, str, int]], dict[str, np.ndarray]]:
    """The spoken-digit utterances (split, voice, text, seed key), every variant x language x digit, and their
    labels {"digit", "language", "rate"}."""
    items, digits, languages = _grid("digit", tuple(LANGUAGES), tuple(str(d) for d in range(10)))
    rates = np.array([rate_of(prosody(key)[0]) for *_, key in items], np.int64)
    return items, {"digit": digits, "language": languages, "rate": rates}


@lru_cache(maxsize=1)
def _spoken_digits() -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """{split: (images, {"digit", "language", "rate": labels})}: one synthesis (per process) for spoken_digit,
    spoken_language and spoken_rate, which label the very same images."""
    items, labels = digit_items()
    synthesised = _utterances(items)
    return {split: (images, {n: y[idx] for n, y in labels.items()}) for split, (images, idx) in synthesised.items()}


def build_spoken_digit() -> Splits:
    return {split: (images, labels["digit"]) for split, (images, labels) in _spoken_digits().items()}


def build_spoken_language() -> Splits:
    return {split: (images, labels["language"]) for split, (images, labels) in _spoken_digits().items()}


def build_spoken_rate() -> Splits:
    return {split: (images, labels["rate"]) for split, (images, labels) in _spoken_digits().items()}


def _spoken_items(what: str, accents: tuple[str, ...], texts: tuple[str, ...]) -> Splits:
    """A task of `texts` (the labels, in order) spoken in `accents` by every voice variant, split by variant."""
    items, labels, _ = _grid(what, accents, texts)
    return {split: (images, labels[idx]) for split, (images, idx) in _utterances(items).items()}


def build_spoken_word() -> Splits:
    return _spoken_items("word", ENGLISH_ACCENTS, WORDS)


def build_spoken_letter() -> Splits:
    return _spoken_items("letter", LETTER_ACCENTS, LETTERS)


ESPEAK_SOURCE = "Debian package espeak-ng=" + sources.ESPEAK_DEBS["espeak-ng"] + " (amd64, with its data and libraries)"
