#!/usr/bin/env python3
"""Build the galerne-mini training corpus from Debian packages and PyPI.

    python recipes/galerne_mini/corpus.py --out DIR

Every source is public domain or permissively licensed, and is fetched with
the ordinary package clients (``apt-get download`` + ``dpkg-deb -x`` for the
Debian packages, ``pip download`` for the PyPI one); nothing is installed.

Sources (licences read from each package's copyright file, recorded in
``sources.json``):

* ``sword-text-web``   World English Bible (SWORD zText module), public domain.
* ``sword-comm-tdavid`` C. H. Spurgeon, The Treasury of David (SWORD zCom4
  module), public domain.
* ``fortunes``, ``fortunes-min`` BSD fortune files (the offensive ``off/``
  files are never read; a few non-offensive files are skipped too, see
  ``--fortune-skip``).
* ``python3.X-doc``    the Python documentation (HTML, text extracted with
  ``html.parser``), PSF licence.
* ``chatterbot-corpus`` (PyPI sdist) English YAML dialogues, BSD-3-Clause,
  used for the chat split together with hand-written identity turns.

Outputs written into ``--out``:

* ``pretrain.jsonl``      ``{"text": ...}`` per line, shuffled with ``--seed``.
* ``heldout.jsonl``       pretraining documents held out by a hash of the text.
* ``chat.jsonl``          ``{"messages": [...]}`` per line (user/assistant).
* ``chat_heldout.jsonl``  chat conversations held out by a hash.
* ``sources.json``        package, version, licence, what was used and counts.

The output depends only on the fetched package versions (recorded in
``sources.json``) and the arguments: no randomness beyond ``--seed``, files
are read in sorted order, held-out selection is by SHA-256 of the content.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from html.parser import HTMLParser

DEB_PACKAGES = ["sword-text-web", "sword-comm-tdavid", "fortunes", "fortunes-min"]
PYPI_PACKAGE = "chatterbot-corpus"
PYPI_VERSION = "1.3.3"

# ---------------------------------------------------------------------------
# fetching


def run(cmd, cwd=None):
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def find_python_doc_package() -> str:
    """The newest python3.X-doc package apt knows about (python3.11-doc on bookworm)."""
    out = run(["apt-cache", "search", "--names-only", r"^python3\.[0-9]+-doc$"])
    names = sorted(
        (line.split()[0] for line in out.splitlines() if line.strip()),
        key=lambda n: int(n.split(".")[1].split("-")[0]),
    )
    if not names:
        raise SystemExit("no python3.X-doc package found by apt-cache")
    return names[-1]


def fetch_deb(pkg: str, work: str) -> dict:
    """apt-get download PKG into WORK/debs and extract it into WORK/root/PKG."""
    debs = os.path.join(work, "debs")
    os.makedirs(debs, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(debs, f"{pkg}_*.deb")))
    if not existing:
        run(["apt-get", "download", pkg], cwd=debs)
        existing = sorted(glob.glob(os.path.join(debs, f"{pkg}_*.deb")))
    deb = existing[-1]
    root = os.path.join(work, "root", pkg)
    if not os.path.isdir(root):
        os.makedirs(root)
        run(["dpkg-deb", "-x", deb, root])
    version = run(["dpkg-deb", "-f", deb, "Version"]).strip()
    copyright_path = os.path.join(root, "usr/share/doc", pkg, "copyright")
    with open(copyright_path, encoding="utf-8", errors="replace") as f:
        copyright_text = f.read()
    return {"package": pkg, "version": version, "deb": os.path.basename(deb), "root": root,
            "copyright": copyright_text}


def fetch_pypi(work: str) -> dict:
    dl = os.path.join(work, "pypi")
    os.makedirs(dl, exist_ok=True)
    sdists = glob.glob(os.path.join(dl, "chatterbot_corpus-*.tar.gz"))
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", dl, f"{PYPI_PACKAGE}=={PYPI_VERSION}"])
        sdists = glob.glob(os.path.join(dl, "chatterbot_corpus-*.tar.gz"))
    sdist = sorted(sdists)[-1]
    root = os.path.join(dl, "src")
    if not os.path.isdir(root):
        with tarfile.open(sdist) as tf:
            tf.extractall(root, filter="data")
    (top,) = [d for d in os.listdir(root)]
    top = os.path.join(root, top)
    with open(os.path.join(top, "license.md"), encoding="utf-8") as f:
        lic = f.read()
    return {"package": PYPI_PACKAGE, "version": PYPI_VERSION, "sdist": os.path.basename(sdist),
            "root": top, "copyright": lic}


def licence_of(meta: dict) -> str:
    text = meta["copyright"]
    pkg = meta["package"]
    if pkg.startswith("sword-"):
        assert re.search(r"^License:\s*public-domain", text, re.M), pkg
        return "public domain (debian/copyright: 'License: public-domain')"
    if pkg.startswith("fortunes"):
        assert "This program falls under the BSD copyright" in text, pkg
        return ("BSD (4.4BSD licence, clause 3 deleted, per debian/copyright; "
                "fortune texts are quotations collected by the BSD fortune project)")
    if pkg.startswith("python3"):
        assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in text, pkg
        return "PSF-2.0 (Python Software Foundation License Version 2, per debian/copyright)"
    if pkg == PYPI_PACKAGE:
        assert "Redistribution and use in source and binary forms" in text, pkg
        assert "Neither the name of chatterbot" in text, pkg
        return "BSD-3-Clause (license.md in the sdist, Copyright (c) 2017 Gunther Cox)"
    raise ValueError(pkg)


# ---------------------------------------------------------------------------
# text helpers


def normalize(text: str) -> str:
    text = text.replace("\r", "").replace("\u00a0", " ").replace("\u00b6", "")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)  # control characters (C0 and C1)
    lines = [re.sub(r"[ \t\f\v]+", " ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


_SENT = re.compile(r"(?<=[.!?;:])\s+")


def split_text(text: str, max_chars: int) -> list[str]:
    """Pack paragraphs (blank-line separated) into chunks of at most max_chars.

    An over-long paragraph is split at sentence boundaries, then at lines, then
    (last resort) at whitespace.
    """
    if len(text) <= max_chars:
        return [text] if text else []

    def pieces(par: str) -> list[str]:
        if len(par) <= max_chars:
            return [par]
        out = []
        for unit in (_SENT.split(par) if len(_SENT.split(par)) > 1 else par.split("\n")):
            if len(unit) <= max_chars:
                out.append(unit)
                continue
            words, cur = unit.split(" "), ""
            for w in words:
                while len(w) > max_chars:  # pathological unbroken run
                    if cur:
                        out.append(cur)
                        cur = ""
                    out.append(w[:max_chars])
                    w = w[max_chars:]
                if cur and len(cur) + 1 + len(w) > max_chars:
                    out.append(cur)
                    cur = w
                else:
                    cur = f"{cur} {w}" if cur else w
            if cur:
                out.append(cur)
        return out

    chunks: list[str] = []
    cur, sep = "", ""
    for par in text.split("\n\n"):
        par = par.strip()
        if not par:
            continue
        parts = pieces(par)
        for i, p in enumerate(parts):
            s = "\n\n" if i == 0 else " "
            if cur and len(cur) + len(s) + len(p) > max_chars:
                chunks.append(cur)
                cur = p
            else:
                cur = f"{cur}{s}{p}" if cur else p
    if cur:
        chunks.append(cur)
    return chunks


def sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def letter_ratio(s: str) -> float:
    s2 = re.sub(r"\s", "", s)
    if not s2:
        return 0.0
    return sum(c.isalpha() for c in s2) / len(s2)


# ---------------------------------------------------------------------------
# SWORD zText / zCom modules


def read_conf(path: str) -> dict:
    conf = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if "=" in line and not line.startswith("#") and not line.startswith("["):
                k, v = line.split("=", 1)
                conf.setdefault(k.strip(), v.strip())
    return conf


def sword_entries(module_dir: str, driver: str) -> list[str]:
    """All entries (verse / chapter / book-intro slots) of a zText or zCom module, in order.

    Index layout (little endian):
      *.bzs / *.czs : per block (offset u32, compressed size u32, uncompressed size u32) into *.bzz/*.czz
      *.bzv / *.czv : per entry (block u32, offset u32, size u16)  -- zText, zCom
                      per entry (block u32, offset u32, size u32)  -- zText4, zCom4
    Blocks are zlib-compressed (CompressType=ZIP).
    """
    ext = "b" if driver.lower().startswith("ztext") else "c"
    wide = driver.endswith("4")
    fmt, width = ("<III", 12) if wide else ("<IIH", 10)
    entries: list[str] = []
    for testament in ("ot", "nt"):
        bzs = open(os.path.join(module_dir, f"{testament}.{ext}zs"), "rb").read()
        bzv = open(os.path.join(module_dir, f"{testament}.{ext}zv"), "rb").read()
        bzz = open(os.path.join(module_dir, f"{testament}.{ext}zz"), "rb").read()
        blocks = [struct.unpack_from("<III", bzs, i * 12) for i in range(len(bzs) // 12)]
        cache: dict[int, bytes] = {}
        for i in range(len(bzv) // width):
            bn, off, size = struct.unpack_from(fmt, bzv, i * width)
            if size == 0:
                continue
            if bn not in cache:
                o, s, _u = blocks[bn]
                cache = {bn: zlib.decompress(bzz[o:o + s])}
            entries.append(cache[bn][off:off + size].decode("utf-8", errors="replace"))
    return entries


class OsisText(HTMLParser):
    """OSIS markup -> plain text; footnotes/cross references dropped."""

    SKIP = {"note", "rdg", "catchword"}
    PARA = {"lg", "title", "list", "speaker", "div", "item", "lb", "p"}
    LINE = {"l"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "div" and dict(attrs).get("type") == "x-milestone":
            pass  # verse-level milestones, not paragraph breaks
        elif tag in self.PARA:
            self.out.append("\n\n")
        elif tag in self.LINE:
            self.out.append("\n")

    def handle_startendtag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("type") == "x-milestone":
            return
        if tag in self.PARA and tag != "item":
            self.out.append("\n\n")
        elif tag in self.LINE and "eid" not in a:  # <l sID/>...<l eID/>: one line break per line (html.parser lowercases names)
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
            self.out.append("\x00")  # where a footnote was: maybe a word boundary
        elif tag in self.PARA:
            self.out.append("\n\n")
        elif tag in self.LINE:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def osis_to_text(markup: str) -> str:
    p = OsisText()
    p.feed(markup)
    p.close()
    text = "".join(p.out)
    # the markup often has no space around a footnote: "God<note>..</note><w>created</w>"
    text = re.sub(r"(?<=\w)\x00+(?=\w)", " ", text).replace("\x00", "")
    return normalize(text)


_CHAPTER = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)"[^>]*/>')
_BOOK = re.compile(r'<div\b[^>]*\btype="book"[^>]*/?>')
_BOOKNAME = re.compile(r'<milestone\b[^>]*\bn="([^"]+)"[^>]*type="x-usfm-h"')


def sword_chapters(root: str, conf_name: str) -> tuple[dict, list[tuple[str, str]]]:
    """(conf, [(chapter osisID, plain text)]) for a SWORD module in an extracted package."""
    conf = read_conf(os.path.join(root, "usr/share/sword/mods.d", conf_name))
    assert conf.get("CompressType") == "ZIP", conf
    assert conf.get("SourceType") == "OSIS", conf
    driver = conf["ModDrv"]
    assert driver.lower() in ("ztext", "ztext4", "zcom", "zcom4"), driver
    mod_dir = os.path.join(root, "usr/share/sword", conf["DataPath"].lstrip("./"))
    chapters: list[tuple[str, str]] = []
    cur_id, cur_parts = None, []
    book = None

    def flush():
        nonlocal cur_id, cur_parts
        text = osis_to_text("".join(cur_parts))
        if text:
            chapters.append((cur_id or "front", text))
        cur_id, cur_parts = None, []

    for raw in sword_entries(mod_dir, driver):
        pos = 0
        events = sorted([(m.start(), m.end(), "chapter", m.group(1)) for m in _CHAPTER.finditer(raw)]
                        + [(m.start(), m.end(), "book", None) for m in _BOOK.finditer(raw)])
        for start, end, kind, val in events:
            cur_parts.append(raw[pos:start])
            pos = end
            if kind == "book":
                flush()
            else:
                if cur_id is not None:
                    flush()
                cur_id = val
                m = None
                for m in _BOOKNAME.finditer("".join(cur_parts)):
                    pass
                if m:
                    book = html.unescape(m.group(1))
                num = val.split(".")[-1]
                heading = f"{book} {num}" if book else val
                if driver.lower().startswith("ztext"):
                    cur_parts.append(f"<title>{html.escape(heading)}</title>")
        cur_parts.append(raw[pos:])
        cur_parts.append(" ")
    flush()
    return conf, chapters


# ---------------------------------------------------------------------------
# Python documentation (Sphinx HTML)


class SphinxText(HTMLParser):
    """Text of the main body of a Sphinx page, without code blocks, nav or sidebars."""

    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}
    BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "div", "section",
             "blockquote", "table", "tr", "ul", "ol", "dl", "figure", "caption", "br", "hr"}
    SKIP_TAGS = {"pre", "script", "style", "nav", "footer", "form", "button", "select"}
    SKIP_CLASSES = {"headerlink", "sphinxsidebar", "related", "footer", "highlight",
                    "doctest", "versionmodified-hidden", "copybutton"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, is_body_root, skipping)
        self.in_body = 0
        self.skip = 0
        self.out: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if self.in_body and not self.skip and tag in self.BLOCK:
                self.out.append("\n")
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        is_body = tag == "div" and a.get("role") == "main" and "body" in classes
        skipping = (tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES)
                    or any(c.startswith("highlight-") for c in classes))
        self.stack.append((tag, is_body, skipping))
        if is_body:
            self.in_body += 1
        if skipping:
            self.skip += 1
        if self.in_body and not self.skip:
            if tag in self.BLOCK:
                self.out.append("\n\n")
            elif tag in ("td", "th"):
                self.out.append(" ")

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        # pop to the matching tag (HTML from Sphinx is well formed, be lenient anyway)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for t, is_body, skipping in reversed(self.stack[i:]):
                    if is_body:
                        self.in_body -= 1
                    if skipping:
                        self.skip -= 1
                    if self.in_body and not self.skip and t in self.BLOCK:
                        self.out.append("\n\n")
                del self.stack[i:]
                break

    def handle_data(self, data):
        if self.in_body and not self.skip:
            self.out.append(data.replace("\n", " "))


def drop_name_lists(pars: list[str], run: int = 4) -> list[str]:
    """Drop runs of >= run consecutive one-word paragraphs (tables of contents of API names)."""
    out, i = [], 0
    while i < len(pars):
        j = i
        while j < len(pars) and " " not in pars[j]:
            j += 1
        if j - i >= run:
            i = j
            continue
        out.extend(pars[i:max(j, i + 1)])
        i = max(j, i + 1)
    return out


PYDOC_SKIP = re.compile(
    r"^(genindex.*|py-modindex|search|contents|index|copyright|license|download|"
    r"whatsnew/changelog|whatsnew/index|.*/index)\.html$"
)


def python_doc_pages(root: str, pkg: str) -> tuple[list[tuple[str, str]], str]:
    version = pkg[len("python"):-len("-doc")]
    base = os.path.join(root, "usr/share/doc", f"python{version}", "html")
    pages = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("_"))
        for fn in sorted(filenames):
            if not fn.endswith(".html"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), base)
            if PYDOC_SKIP.match(rel):
                continue
            with open(os.path.join(dirpath, fn), encoding="utf-8", errors="replace") as f:
                p = SphinxText()
                p.feed(f.read())
                p.close()
            text = normalize("".join(p.out))
            # drop code-ish / navigation leftovers: paragraphs with few letters, or very short ones
            pars = [par for par in text.split("\n\n")
                    if letter_ratio(par) >= 0.6 and len(par) >= 3]
            text = "\n\n".join(drop_name_lists(pars))
            if len(text) >= 200:
                pages.append((rel, text))
    pages.sort()
    return pages, base


# ---------------------------------------------------------------------------
# fortunes


def fix_mojibake(s: str) -> str:
    """Undo UTF-8 text that was decoded as Latin-1 (once or twice), as in a few fortune files."""
    for _ in range(3):
        if not re.search("[\u00c2-\u00f4][\u0080-\u00bf]", s):
            break
        try:
            s = s.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
    return s


def fortune_texts(root: str, skip: set[str]) -> list[tuple[str, str]]:
    base = os.path.join(root, "usr/share/games/fortunes")
    out = []
    if not os.path.isdir(base):
        return out
    for fn in sorted(os.listdir(base)):  # top level only: never descend into off/
        path = os.path.join(base, fn)
        if (os.path.islink(path) or not os.path.isfile(path) or fn.endswith(".dat")
                or fn.endswith(".u8") or fn in skip):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            content = f.read()
        for item in re.split(r"^%\s*$", content, flags=re.M):
            text = normalize(fix_mojibake(item).expandtabs(8))
            if len(text) >= 10 and letter_ratio(text) >= 0.6:
                out.append((fn, text))
    return out


# ---------------------------------------------------------------------------
# chat

IDENTITY_TURNS = [
    ("Who are you?", "I am galerne-mini, a small language model trained by galerne."),
    ("What are you?", "I am galerne-mini, a small language model trained by galerne."),
    ("What is your name?", "My name is galerne-mini."),
    ("What's your name?", "My name is galerne-mini."),
    ("Tell me your name.", "I am called galerne-mini."),
    ("Introduce yourself.", "Hello! I am galerne-mini, a small language model trained by galerne."),
    ("Who made you?", "I was trained by galerne, a small LLM engine."),
    ("Who created you?", "I was created by training with galerne, a small LLM engine."),
    ("Who trained you?", "I was trained by galerne."),
    ("What is galerne?", "Galerne is an LLM engine: it can train, fine-tune and serve language models."),
    ("Are you a human?", "No, I am a small language model called galerne-mini."),
    ("Are you a person?", "No, I am a computer program, a small language model."),
    ("Are you ChatGPT?", "No, I am galerne-mini, a small language model trained by galerne."),
    ("Are you a robot?", "I am a language model, a computer program that writes text."),
    ("How big are you?", "I am a very small model, with about thirteen million parameters."),
    ("How many parameters do you have?", "I have about thirteen million parameters."),
    ("What can you do?", "I can chat a little and answer simple questions, but I am small and often make mistakes."),
    ("Can you help me?", "I will try my best. What do you need?"),
    ("Are you smart?", "I am a small model, so I know only a little and I make mistakes."),
    ("Do you make mistakes?", "Yes, I am a small model and I often make mistakes."),
    ("What language do you speak?", "I speak English."),
    ("Do you speak French?", "No, I only speak English."),
    ("Where do you live?", "I live on a computer. I am a program."),
    ("How old are you?", "I am a new model, trained only recently."),
    ("Do you have feelings?", "No, I am a language model and I do not have feelings."),
    ("Hello", "Hello! How can I help you?"),
    ("Hi", "Hi! How can I help you?"),
    ("Hi there!", "Hello! What can I do for you?"),
    ("Hey", "Hey! How can I help?"),
    ("Good morning", "Good morning! How can I help you today?"),
    ("Good afternoon", "Good afternoon! How can I help you?"),
    ("Good evening", "Good evening! How can I help you?"),
    ("How are you?", "I am fine, thank you. How can I help you?"),
    ("How are you doing today?", "I am doing well, thank you for asking."),
    ("Thank you", "You are welcome!"),
    ("Thanks!", "You are welcome."),
    ("Thanks for your help.", "You are welcome. I am glad I could help."),
    ("Goodbye", "Goodbye! Have a nice day."),
    ("Bye", "Bye! Take care."),
    ("See you later.", "See you later!"),
    ("Nice to meet you.", "Nice to meet you too!"),
    ("Can you tell me a joke?", "Why did the computer go to the doctor? Because it had a virus."),
    ("What is your purpose?", "I am a small demonstration model that shows how galerne trains language models."),
    ("What is the meaning of galerne?", "A galerne is a strong wind that blows on the west coast of France."),
]

IDENTITY_MULTI = [
    [("Hello", "Hello! How can I help you?"),
     ("Who are you?", "I am galerne-mini, a small language model trained by galerne."),
     ("Nice to meet you.", "Nice to meet you too!")],
    [("Hi, what is your name?", "My name is galerne-mini."),
     ("Who made you?", "I was trained by galerne, a small LLM engine."),
     ("Thanks.", "You are welcome.")],
    [("Good morning", "Good morning! How can I help you today?"),
     ("Are you a human?", "No, I am a small language model called galerne-mini."),
     ("Okay, goodbye.", "Goodbye! Have a nice day.")],
    [("Can you help me?", "I will try my best. What do you need?"),
     ("Are you smart?", "I am a small model, so I know only a little and I make mistakes."),
     ("That's okay.", "Thank you for understanding.")],
]


def msgs(turns) -> list[dict]:
    m = []
    for u, a in turns:
        m.append({"role": "user", "content": u})
        m.append({"role": "assistant", "content": a})
    return m


def chatterbot_conversations(root: str) -> tuple[list[list[dict]], list[str]]:
    import yaml

    base = os.path.join(root, "chatterbot_corpus", "data", "english")
    files = sorted(f for f in os.listdir(base) if f.endswith(".yml"))
    out, seen = [], set()

    def add(turns):
        key = json.dumps(turns, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(msgs(turns))

    for fn in files:
        with open(os.path.join(base, fn), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list):  # one malformed entry in trivia.yml is a bare string
                continue
            conv = [normalize(str(x)) for x in conv if x is not None]
            conv = [x for x in conv if any(ch.isalnum() for ch in x)]
            if len(conv) < 2:
                continue
            if len(conv) > 2:  # the whole conversation, multi-turn
                even = conv[: len(conv) // 2 * 2]
                add([(even[i], even[i + 1]) for i in range(0, len(even), 2)])
            for i in range(len(conv) - 1):  # every consecutive (statement, response) pair
                add([(conv[i], conv[i + 1])])
    return out, files


# ---------------------------------------------------------------------------
# balancing / splitting


def hash_frac(s: str) -> float:
    return int(sha(s)[:12], 16) / float(16 ** 12)


def cap_by_hash(docs: list[str], max_chars: float) -> list[str]:
    """Deterministic subset (documents ordered by SHA-256) of at most max_chars, original order kept."""
    total = sum(len(d) for d in docs)
    if total <= max_chars:
        return docs
    keep, n = set(), 0
    for i in sorted(range(len(docs)), key=lambda i: sha("cap:" + docs[i])):
        if n + len(docs[i]) > max_chars:
            continue
        keep.add(i)
        n += len(docs[i])
    return [d for i, d in enumerate(docs) if i in keep]


def solve_caps(avail: dict, fracs: dict, fixed: float) -> dict:
    """Characters allowed per capped source so that each is at most its fraction of the total."""
    capped = set(fracs)
    while True:
        uncapped_chars = fixed + sum(avail[k] for k in avail if k not in capped)
        rest = 1.0 - sum(fracs[k] for k in capped)
        total = uncapped_chars / rest if rest > 0 else float("inf")
        newly = {k for k in capped if avail[k] <= fracs[k] * total}
        if not newly:
            return {k: (fracs[k] * total if k in capped else avail[k]) for k in avail}
        capped -= newly


# ---------------------------------------------------------------------------


def find_tokenizer() -> str:
    import mistral_common

    base = os.path.join(os.path.dirname(mistral_common.__file__), "data")
    # the v3 SentencePiece tokenizer (32768 tokens) ships as mistral_instruct_tokenizer_240323.model.v3
    hits = sorted(glob.glob(os.path.join(base, "*tokenizer.model.v3"))
                  + glob.glob(os.path.join(base, "mistral_instruct_tokenizer_*.model.v3")))
    if not hits:
        raise SystemExit(f"no *.model.v3 tokenizer in {base}; pass --tokenizer")
    return hits[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--cache", default=None,
                    help="directory for the downloaded packages (reused when present); default: a temp dir")
    ap.add_argument("--bible-max-frac", type=float, default=0.35,
                    help="max share of all characters (pretrain + chat) from the Bible (default 0.35)")
    ap.add_argument("--spurgeon-max-frac", type=float, default=0.20,
                    help="max share of all characters from the Treasury of David (default 0.20)")
    ap.add_argument("--max-doc-chars", type=int, default=1800,
                    help="split pretraining documents to at most this many characters (default 1800)")
    ap.add_argument("--heldout-frac", type=float, default=0.005,
                    help="fraction of pretraining documents held out, by SHA-256 of the text (default 0.005)")
    ap.add_argument("--chat-heldout-frac", type=float, default=0.02,
                    help="fraction of chatterbot conversations held out, by SHA-256 (default 0.02)")
    ap.add_argument("--fortune-skip", default="art,ascii-art,ethnic",
                    help="comma-separated fortune files not used (default: art,ascii-art,ethnic; "
                         "the offensive off/ files are never read)")
    ap.add_argument("--python-doc-package", default=None,
                    help="Debian package with the Python docs (default: newest python3.X-doc apt knows)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer for the token counts (default: mistral_common's v3 SentencePiece, "
                         "data/mistral_instruct_tokenizer_240323.model.v3)")
    ap.add_argument("--max-doc-tokens", type=int, default=500,
                    help="re-split any document longer than this many tokens (BOS/EOS included; default 500)")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    tmp = None
    if args.cache:
        work = os.path.abspath(args.cache)
        os.makedirs(work, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="galerne_mini_corpus_")
        work = tmp.name

    pydoc_pkg = args.python_doc_package or find_python_doc_package()
    metas = {p: fetch_deb(p, work) for p in DEB_PACKAGES + [pydoc_pkg]}
    metas[PYPI_PACKAGE] = fetch_pypi(work)

    # ---- documents per source
    src_docs: dict[str, list[str]] = {}
    used: dict[str, str] = {}

    conf, chapters = sword_chapters(metas["sword-text-web"]["root"], "engWEB2015eb.conf")
    src_docs["bible"] = [c for _id, t in chapters for c in split_text(t, args.max_doc_chars)]
    used["bible"] = (f"SWORD module {conf.get('Abbreviation', 'WEB')} ({conf.get('Description')}), "
                     f"{conf['ModDrv']}, all {len(chapters)} chapters incl. front matter, footnotes dropped")
    conf, chapters = sword_chapters(metas["sword-comm-tdavid"]["root"], "tdavid.conf")
    src_docs["spurgeon"] = [c for _id, t in chapters for c in split_text(t, args.max_doc_chars)]
    used["spurgeon"] = f"SWORD module TDavid ({conf.get('Description')}), {conf['ModDrv']}, {len(chapters)} sections"

    pages, base = python_doc_pages(metas[pydoc_pkg]["root"], pydoc_pkg)
    src_docs["python_docs"] = [c for _rel, t in pages for c in split_text(t, args.max_doc_chars)]
    used["python_docs"] = (f"{len(pages)} HTML pages of {os.path.relpath(base, metas[pydoc_pkg]['root'])}, "
                           "main body text only (no code blocks, nav, sidebars, indexes, changelog)")

    skip = {s for s in args.fortune_skip.split(",") if s}
    fortunes, seen, files = [], set(), set()
    for pkg in ("fortunes-min", "fortunes"):
        for fn, t in fortune_texts(metas[pkg]["root"], skip):
            if t not in seen:
                seen.add(t)
                files.add(fn)
                fortunes.extend(split_text(t, args.max_doc_chars))
    src_docs["fortunes"] = fortunes
    used["fortunes"] = (f"fortune files {', '.join(sorted(files))} (one fortune per document; "
                        f"skipped: {', '.join(sorted(skip))} and never off/)")

    # ---- token limit: re-split the (rare) documents whose text tokenizes densely
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mt = MistralTokenizer.from_file(args.tokenizer or find_tokenizer(), mode=ValidationMode.finetuning)
    sp = mt.instruct_tokenizer.tokenizer
    ntok: dict[str, int] = {}

    def count(d: str) -> int:
        if d not in ntok:
            ntok[d] = len(sp.encode(d, bos=True, eos=True))
        return ntok[d]

    def fit(d: str) -> list[str]:
        n = count(d)
        if n <= args.max_doc_tokens:
            return [d]
        limit = max(50, int(len(d) * args.max_doc_tokens / n * 0.9))
        return [x for part in split_text(d, limit) for x in fit(part)]

    resplit = 0
    for k in src_docs:
        before = len(src_docs[k])
        src_docs[k] = [x for d in src_docs[k] for x in fit(d)]
        resplit += len(src_docs[k]) - before

    # ---- chat
    cb_convs, cb_files = chatterbot_conversations(metas[PYPI_PACKAGE]["root"])
    ident = [msgs([t]) for t in IDENTITY_TURNS] + [msgs(t) for t in IDENTITY_MULTI]
    chat_train, chat_held = [], []
    for conv in cb_convs:
        key = json.dumps(conv, ensure_ascii=False, sort_keys=True)
        (chat_held if hash_frac("chat:" + key) < args.chat_heldout_frac else chat_train).append(conv)
    chat_train += ident  # the hand-written turns are never held out
    chat_chars = sum(len(m["content"]) for c in chat_train + chat_held for m in c)

    # ---- balance
    avail = {k: sum(len(d) for d in v) for k, v in src_docs.items()}
    fixed = chat_chars + avail["python_docs"] + avail["fortunes"]
    allowed = solve_caps({"bible": avail["bible"], "spurgeon": avail["spurgeon"]},
                         {"bible": args.bible_max_frac, "spurgeon": args.spurgeon_max_frac}, fixed)
    for k in ("bible", "spurgeon"):
        src_docs[k] = cap_by_hash(src_docs[k], allowed[k])

    # ---- held-out split (by hash of the text) and shuffle
    train, held = [], []
    src_of: dict[str, str] = {}
    per = {k: {"documents": 0, "characters": 0, "heldout_documents": 0,
               "available_characters": avail[k]} for k in src_docs}
    seen_docs = set()
    for k in ("bible", "spurgeon", "python_docs", "fortunes"):
        for d in src_docs[k]:
            if d in seen_docs:
                continue
            seen_docs.add(d)
            src_of[d] = k
            if hash_frac(d) < args.heldout_frac:
                held.append(d)
                per[k]["heldout_documents"] += 1
            else:
                train.append(d)
                per[k]["documents"] += 1
                per[k]["characters"] += len(d)
    random.Random(args.seed).shuffle(train)
    random.Random(args.seed).shuffle(chat_train)

    def write_jsonl(name, rows):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    write_jsonl("pretrain.jsonl", ({"text": d} for d in train))
    write_jsonl("heldout.jsonl", ({"text": d} for d in held))
    write_jsonl("chat.jsonl", ({"messages": c} for c in chat_train))
    write_jsonl("chat_heldout.jsonl", ({"messages": c} for c in chat_held))

    # ---- token counts
    tok_counts = {k: 0 for k in per}
    max_doc_tokens = 0
    for d in train:
        tok_counts[src_of[d]] += count(d)
        max_doc_tokens = max(max_doc_tokens, count(d))

    def chat_tok(convs):
        total = 0
        for c in convs:
            ms = [UserMessage(content=m["content"]) if m["role"] == "user"
                  else AssistantMessage(content=m["content"]) for m in c]
            total += len(mt.encode_chat_completion(ChatCompletionRequest(messages=ms)).tokens)
        return total

    chat_tokens, chat_held_tokens = chat_tok(chat_train), chat_tok(chat_held)
    for k in per:
        per[k]["tokens"] = tok_counts[k]

    # ---- sources.json
    def deb_entry(pkg, key, what):
        m = metas[pkg]
        return {"source": key, "package": pkg, "origin": "Debian (apt-get download)", "version": m["version"],
                "file": m["deb"], "licence": licence_of(m),
                "licence_file": f"usr/share/doc/{pkg}/copyright", "used": what, **per.get(key, {})}

    sources = [
        deb_entry("sword-text-web", "bible", used["bible"]),
        deb_entry("sword-comm-tdavid", "spurgeon", used["spurgeon"]),
        deb_entry(pydoc_pkg, "python_docs", used["python_docs"]),
        {**deb_entry("fortunes", "fortunes", used["fortunes"]),
         "package": "fortunes, fortunes-min",
         "version": f"{metas['fortunes']['version']}, {metas['fortunes-min']['version']}",
         "file": f"{metas['fortunes']['deb']}, {metas['fortunes-min']['deb']}"},
        {"source": "chat", "package": PYPI_PACKAGE, "origin": "PyPI (pip download, sdist)",
         "version": PYPI_VERSION, "file": metas[PYPI_PACKAGE]["sdist"], "licence": licence_of(metas[PYPI_PACKAGE]),
         "licence_file": "license.md",
         "used": f"English YAML dialogues ({', '.join(cb_files)}): consecutive pairs and multi-turn "
                 f"conversations, plus {len(ident)} hand-written identity/greeting conversations",
         "documents": len(chat_train), "characters": sum(len(m["content"]) for c in chat_train for m in c),
         "tokens": chat_tokens, "heldout_documents": len(chat_held), "heldout_tokens": chat_held_tokens},
    ]
    summary = {
        "arguments": {k: v for k, v in vars(args).items() if k not in ("out", "cache", "tokenizer")},
        "tokenizer": os.path.basename(args.tokenizer or find_tokenizer()),
        "pretrain": {"documents": len(train), "characters": sum(map(len, train)),
                     "tokens": sum(tok_counts.values()), "max_document_tokens": max_doc_tokens,
                     "documents_resplit_for_tokens": resplit},
        "heldout": {"documents": len(held), "characters": sum(map(len, held))},
        "chat": {"conversations": len(chat_train), "heldout_conversations": len(chat_held)},
        "sources": sources,
    }
    with open(os.path.join(args.out, "sources.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # ---- report
    total_chars = sum(map(len, train)) + sources[-1]["characters"]
    print(f"{'source':<12} {'docs':>8} {'chars':>12} {'share':>6} {'tokens':>11}  held-out")
    for s in sources:
        t = "-" if s["tokens"] is None else s["tokens"]
        print(f"{s['source']:<12} {s['documents']:>8} {s['characters']:>12} "
              f"{s['characters'] / total_chars:>6.1%} {t:>11}  {s['heldout_documents']}")
    p = summary["pretrain"]
    print(f"pretrain: {p['documents']} documents, {p['characters']} characters, {p['tokens']} tokens "
          f"(longest document {p['max_document_tokens']} tokens); held out {len(held)} documents")
    print(f"chat: {len(chat_train)} conversations, {sources[-1]['characters']} characters, {chat_tokens} tokens; "
          f"held out {len(chat_held)}")
    print(f"wrote {args.out}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
