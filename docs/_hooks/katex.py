"""MkDocs hook: render the site's math offline with KaTeX, fetched once from the npm registry (never committed).

``pymdownx.arithmatex`` (generic mode) turns ``$...$`` / ``$$...$$`` on the pages, and the
``.. math::`` blocks of the docstrings (``rst_markdown.py`` makes them ``$$`` blocks), into
``<span class="arithmatex">\\(...\\)</span>`` / ``<div class="arithmatex">\\[...\\]</div>``;
``docs/javascripts/katex.js`` renders them in the browser with KaTeX. This hook

* puts KaTeX's ``katex.min.js``, ``katex.min.css`` and its ``woff2`` fonts into the site under
  ``assets/katex/`` (nothing is loaded from the network when a page is read);
* gets them with ``npm pack katex@VERSION`` the first time, checks the tarball against its pinned
  sha512, and keeps them in a cache outside the repository (``$XDG_CACHE_HOME`` or
  ``~/.cache``, folder ``engm-opacus-docs/katex-VERSION``); ``ENGM_KATEX_DIR`` may name a folder
  holding an unpacked ``katex`` package's ``dist`` files instead (a machine without npm);
* checks every formula of the site with KaTeX itself (one ``node`` process) after the build: a
  formula KaTeX cannot parse is a warning, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

KATEX_VERSION = "0.16.47"
KATEX_INTEGRITY = "sha512-Eeo8Ys1doU1z+x8AZsPpQu+p/QcZBI5PeOo7QGQdy2x2m0MU/hYagBbGOmXwr5KVbEfVuWv9LpnQWeehogurjg=="
"""npm's ``dist.integrity`` of ``katex@KATEX_VERSION`` (``npm view katex@0.16.47 dist.integrity``)."""
SITE_FOLDER = "assets/katex"
ENV_DIR = "ENGM_KATEX_DIR"
REQUIRED = ("katex.min.js", "katex.min.css")
MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)

log = logging.getLogger("mkdocs.hooks.katex")
_formulas: List[Tuple[str, str, bool]] = []  # (page, tex, display) of the current build


def cache_dir() -> Path:
    """Where the fetched KaTeX files are kept (outside the repository, shared by its clones)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "engm-opacus-docs" / f"katex-{KATEX_VERSION}"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED) and any((folder / "fonts").glob("*.woff2"))


def wanted(member: str) -> Optional[str]:
    """The site-relative name of a tarball member that the site needs, else ``None``."""
    if member == "package/LICENSE":
        return "LICENSE"
    if member in (f"package/dist/{name}" for name in REQUIRED):
        return member.removeprefix("package/dist/")
    if member.startswith("package/dist/fonts/") and member.endswith(".woff2"):
        return member.removeprefix("package/dist/")
    return None


def fetch(dest: Path) -> None:
    """``npm pack katex@KATEX_VERSION``, check its sha512, unpack the needed files into ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            f"The docs render math with KaTeX {KATEX_VERSION}, fetched once from the npm registry, but npm is not installed. "
            f"Fix: install Node.js and npm (e.g. apt-get install npm), or set {ENV_DIR} to a folder with the dist files "
            f"(katex.min.js, katex.min.css, fonts/) of katex {KATEX_VERSION}."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [npm, "pack", f"katex@{KATEX_VERSION}", "--pack-destination", tmp, "--silent"],
            capture_output=True, text=True, timeout=600, cwd=tmp,
        )
        tarballs = list(Path(tmp).glob("katex-*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise PluginError(f"npm pack katex@{KATEX_VERSION} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        data = tarballs[0].read_bytes()
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        if integrity != KATEX_INTEGRITY:
            raise PluginError(f"katex@{KATEX_VERSION} from npm has integrity {integrity}, expected {KATEX_INTEGRITY}.")
        staging = Path(tempfile.mkdtemp(prefix=".katex-", dir=dest.parent))
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                name = wanted(member.name) if member.isfile() else None
                if name:
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(tar.extractfile(member).read())
        if not is_complete(staging):
            shutil.rmtree(staging, ignore_errors=True)
            raise PluginError(f"katex@{KATEX_VERSION} from npm lacks {', '.join(REQUIRED)} or its woff2 fonts.")
        try:
            os.replace(staging, dest)
        except OSError:  # another build filled the cache meanwhile
            shutil.rmtree(staging, ignore_errors=True)


def katex_dir() -> Path:
    """The folder with KaTeX's files: ``ENGM_KATEX_DIR``, or the cache (filled on first use)."""
    override = os.environ.get(ENV_DIR)
    if override:
        folder = Path(override)
        if not all((folder / name).is_file() for name in REQUIRED):
            raise PluginError(f"{ENV_DIR}={override} has no {' and '.join(REQUIRED)}. Fix: point it at katex's dist folder.")
        return folder
    folder = cache_dir()
    if not is_complete(folder):
        log.info("Fetching KaTeX %s from the npm registry into %s", KATEX_VERSION, folder)
        fetch(folder)
    return folder


def on_config(config):  # noqa: ANN001, ANN201 - MkDocs hook signature
    """Check that mkdocs.yml loads the KaTeX files this hook provides."""
    scripts = [str(s) for s in config.extra_javascript]
    if f"{SITE_FOLDER}/katex.min.js" not in scripts or f"{SITE_FOLDER}/katex.min.css" not in config.extra_css:
        raise PluginError(f"mkdocs.yml must list {SITE_FOLDER}/katex.min.js in extra_javascript and {SITE_FOLDER}/katex.min.css in extra_css.")
    _formulas.clear()
    return config


def on_files(files, config):  # noqa: ANN001, ANN201
    """Add KaTeX's files to the site under ``assets/katex/``."""
    folder = katex_dir()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == "LICENSE" or rel in REQUIRED or (rel.startswith("fonts/") and rel.endswith(".woff2")):
            files.append(File.generated(config, f"{SITE_FOLDER}/{rel}", abs_src_path=str(path)))
    return files


def on_page_content(content: str, page, config, files) -> str:  # noqa: ANN001
    """Collect the page's formulas for the check after the build."""
    for tag, body in MATH.findall(content):
        tex = html.unescape(re.sub(r"<[^>]+>", "", body)).strip()
        if len(tex) >= 4 and tex[:2] in ("\\(", "\\[") and tex[-2:] in ("\\)", "\\]"):
            tex = tex[2:-2]
        _formulas.append((page.file.src_uri, tex, tag == "div"))
    return content


CHECK_SCRIPT = """
const katex = require(process.argv[1]);
const items = JSON.parse(require("fs").readFileSync(0, "utf8"));
const errors = [];
for (const [page, tex, display] of items) {
  try { katex.renderToString(tex, { displayMode: display, throwOnError: true }); }
  catch (error) { errors.push([page, tex, String(error.message)]); }
}
process.stdout.write(JSON.stringify(errors));
"""


def on_post_build(config) -> None:  # noqa: ANN001
    """Parse every formula with KaTeX (node); each one it rejects is a warning (a failure with --strict)."""
    node = shutil.which("node")
    if node is None or not _formulas:
        if _formulas:
            log.info("node not found: the %d formulas were not checked with KaTeX at build time", len(_formulas))
        return
    unique: Dict[Tuple[str, str, bool], None] = dict.fromkeys(_formulas)
    done = subprocess.run(
        [node, "-e", CHECK_SCRIPT, str(katex_dir() / "katex.min.js")], input=json.dumps(list(unique)),
        capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0:
        log.warning("KaTeX check of the formulas failed to run: %s", done.stderr.strip()[-500:])
        return
    for page, tex, message in json.loads(done.stdout):
        log.warning("KaTeX cannot render a formula on %s: %s\n    %s", page, message, tex)
    log.info("KaTeX %s checked %d formulas", KATEX_VERSION, len(unique))
