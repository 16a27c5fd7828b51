"""Natural-language corpora for training from scratch, read offline from files that packages carry.

A corpus is a list of documents (strings). Sources are given as paths or as short names:

- `gensim:enwiki`: the English Wikipedia sample in the `gensim` wheel (206 pages, wiki markup
  stripped here; redirects and non-article pages dropped), one document per article;
- `gensim:lee`: the Lee background corpus in the same wheel (300 news stories, one per line).

Any other path is read by its content and suffix: a MediaWiki XML export (optionally bz2), `.cor`
as one document per line, anything else as plain text with documents separated by blank lines.
The `gensim` package is located, never imported (its import pulls scipy, which memlm does not need).
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from memlm.errors import MemlmError

NAMED = {
    "gensim:enwiki": ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
    "gensim:lee": ("gensim", "test/test_data/lee_background.cor"),
}
DEFAULT_CORPUS = ("gensim:enwiki", "gensim:lee")


def resolve(source: str) -> Path:
    """A corpus name or path -> an existing file (one-line error otherwise)."""
    if source in NAMED:
        package, relative = NAMED[source]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise MemlmError(f"corpus {source} needs the package {package!r} (pip install --no-deps gensim==4.4.0)")
        path = Path(spec.submodule_search_locations[0]) / relative
    else:
        path = Path(source)
    if not path.is_file():
        raise MemlmError(f"corpus file not found: {path}")
    return path


def read_documents(source: str) -> list[str]:
    """The non-empty documents of one source."""
    path = resolve(source)
    name = path.name
    try:
        if _is_mediawiki(path):
            docs = list(_wiki_articles(path))
        else:
            text = (
                bz2.open(path, "rt", encoding="utf-8") if name.endswith(".bz2") else open(path, encoding="utf-8")
            ).read()
            docs = text.splitlines() if name.endswith((".cor", ".cor.bz2")) else re.split(r"\n\s*\n", text)
    except (OSError, UnicodeDecodeError, ET.ParseError, EOFError) as e:
        raise MemlmError(f"cannot read corpus {path}: {e}") from None
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise MemlmError(f"corpus {path} has no text")
    return docs


def read_corpus(sources: list[str]) -> tuple[list[str], list[str]]:
    """All documents of all sources, in order, and the resolved file of each source."""
    docs, files = [], []
    for source in sources:
        docs += read_documents(source)
        files.append(str(resolve(source)))
    return docs, files


# ---- MediaWiki -----------------------------------------------------------------------------------


def _is_mediawiki(path: Path) -> bool:
    opener = bz2.open if path.name.endswith(".bz2") else open
    with opener(path, "rb") as f:
        return b"<mediawiki" in f.read(512)


def _wiki_articles(path: Path):
    opener = bz2.open if path.name.endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, element in ET.iterparse(f):
            if _local(element.tag) != "page":
                continue
            ns = _child_text(element, "ns")
            text = ""
            for child in element.iter():
                if _local(child.tag) == "text":
                    text = child.text or ""
            redirect = any(_local(c.tag) == "redirect" for c in element)
            element.clear()
            if ns == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                plain = strip_wiki_markup(text)
                if len(plain) > 200:  # stubs and disambiguation leftovers carry no prose
                    yield plain


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return child.text
    return None


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG_BLOCK = re.compile(r"<(gallery|math|timeline|imagemap|score|syntaxhighlight|source)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK_START = re.compile(r"\[\[(?:File|Image|Category|Media):", re.I)
_INTERWIKI = re.compile(r"\[\[[a-z\-]{2,12}:[^\]]*\]\]")
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_SKIP_SECTIONS = re.compile(r"^(See also|References|External links|Further reading|Notes|Bibliography)$", re.M)


def strip_wiki_markup(text: str) -> str:
    """Wiki markup -> plain prose: templates, tables, references, files and tags go; link text stays."""
    text = _COMMENT.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _REF.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _remove_file_links(text)
    text = _INTERWIKI.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _LIST.sub("", text)
    text = text.replace("&nbsp;", " ").replace("&amp;", "&").replace("&ndash;", "-").replace("&mdash;", "-")
    cut = _SKIP_SECTIONS.search(text)  # the tail of an article is lists of links, not prose
    if cut:
        text = text[: cut.start()]
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if line and not line.startswith(("|", "!")))
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def _remove_file_links(text: str) -> str:
    """Remove [[File:...]] links whole: their captions nest links of their own."""
    out, position = [], 0
    for match in _FILE_LINK_START.finditer(text):
        if match.start() < position:
            continue  # inside a link already removed
        out.append(text[position : match.start()])
        depth, i = 0, match.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        position = i
    out.append(text[position:])
    return "".join(out)


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced open_ ... close spans (templates nest, so a regex cannot)."""
    out, depth, i, start = [], 0, 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
            if depth == 0:
                start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def token_windows(tokenizer, documents, count: int, seq_len: int) -> list[list[int]]:
    """The first `count` full windows of `seq_len` tokens of the documents, joined in order (deterministic)."""
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer.encode(doc + "\n\n", add_special_tokens=False)
        if len(ids) >= count * seq_len:
            break
    return [ids[i : i + seq_len] for i in range(0, count * seq_len, seq_len) if len(ids[i : i + seq_len]) == seq_len]


def corpus_windows(tokenizer, source: str, count: int, seq_len: int, what: str = "text") -> list[list[int]]:
    """`token_windows` of a corpus (a name such as gensim:enwiki, or a text file): deterministic, so
    a run can be repeated; a corpus shorter than one window is a one-line error naming `what` it is."""
    windows = token_windows(tokenizer, read_documents(source), count, seq_len)
    if not windows:
        raise MemlmError(f"{what} {source!r} is shorter than one window of {seq_len} tokens")
    return windows
