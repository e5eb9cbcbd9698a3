"""Builds the embedded demo retrieval dataset from Debian's English man pages.

The demo data (shipped in `samtone_jax/tasks/data/manpages/`) is real text that nobody on this
project wrote: each man page gives one query, its one-line NAME summary ("copy a string"), and
one document, the first words of its DESCRIPTION section. Pages are split 90/10 into train and
test by a hash of the page id; the corpus holds every page so test retrieval runs over all of it.

Steps (needs network and Debian's apt; the package itself never runs this):
  1. `apt-get download` the packages in `PACKAGES` and unpack each with `dpkg -x`.
  2. Render every regular man page file (symlinks and `.so` aliases are skipped: they are the
     same page under another name) with `mandoc -T utf8`, strip the overstrike bold/underline.
  3. Keep pages that have a NAME summary and a DESCRIPTION of at least `MIN_WORDS` words; drop
     pages whose (summary, description) pair repeats an earlier page.
  4. Write the BEIR layout (corpus.jsonl.gz, queries.jsonl.gz, qrels/{train,test}.tsv),
     train.tsv.gz (query<TAB>document), the sources' copyright files, and train a SentencePiece
     model (BPE; T5 ids: pad=0, eos=1, unk=2; no BOS) on the corpus and queries.

Usage:
  apt-get install mandoc   # once
  python scripts/build_manpages_demo.py --out samtone_jax/tasks/data/manpages
"""

import argparse
import collections
import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile

import sentencepiece as spm

# Debian bookworm packages with English man pages (section 1-8 pages, C library, Perl, git,
# OpenSSL): together ~2,700 distinct pages.
PACKAGES = ("manpages", "manpages-dev", "git-man", "libssl-doc", "perl-doc")
MAX_WORDS = 300  # document = first MAX_WORDS words of DESCRIPTION
MIN_WORDS = 8
TEST_FRACTION_PERCENT = 10
VOCAB_SIZE = 8000
_SECTION_RE = re.compile(r"^([A-Z][A-Z0-9 ,/&()-]*)\s*$")
_OVERSTRIKE_RE = re.compile(r".\x08")


def download_and_unpack(packages: tuple[str, ...], work_dir: str) -> dict[str, str]:
  """Downloads each .deb with apt and unpacks it; returns package -> unpacked root."""
  roots = {}
  for package in packages:
    subprocess.run(["apt-get", "download", package], cwd=work_dir, check=True)
    (deb,) = glob.glob(os.path.join(work_dir, f"{package}_*.deb"))
    root = os.path.join(work_dir, "root_" + package)
    subprocess.run(["dpkg", "-x", deb, root], check=True)
    roots[package] = root
  return roots


def render(path: str) -> str:
  """Renders one man page to plain text with mandoc (overstrike removed)."""
  out = subprocess.run(["mandoc", "-T", "utf8", "-O", "width=200", path], capture_output=True,
                       check=False).stdout.decode("utf-8", errors="replace")
  return _OVERSTRIKE_RE.sub("", out)


def sections(text: str) -> dict[str, list[str]]:
  """Splits rendered text into {SECTION HEADING: body lines} (first occurrence wins)."""
  result: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    match = _SECTION_RE.match(line)
    if match and not line.startswith(" "):
      current = match.group(1).strip()
      if current in result:
        current = None  # a repeated heading (e.g. the footer) ends the useful text
      else:
        result[current] = []
    elif current is not None:
      result[current].append(line)
  return result


def clean_words(lines: list[str]) -> list[str]:
  """Joins lines into words, undoing the hyphenation at line ends."""
  text = "\n".join(line.strip() for line in lines)
  text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)  # mandoc may hyphenate long words
  return text.split()


def page_summary(name_lines: list[str]) -> str | None:
  """The text after ' - ' in the first NAME paragraph, e.g. 'copy or catenate a string'."""
  paragraph = []
  for line in name_lines:
    if not line.strip():
      if paragraph:
        break
      continue
    paragraph.append(line)
  name = " ".join(clean_words(paragraph))
  for dash in (" - ", " \u2010 ", " \u2212 ", " \u2014 "):
    if dash in name:
      summary = name.split(dash, 1)[1].strip()
      return summary or None
  return None


def extract_pages(roots: dict[str, str]) -> list[dict[str, str]]:
  """Returns [{id, package, query, document}] sorted by id, deduplicated."""
  pages = []
  seen = set()
  for package, root in sorted(roots.items()):
    for path in sorted(glob.glob(os.path.join(root, "usr/share/man/man*/*"))):
      if os.path.islink(path) or not os.path.isfile(path):
        continue
      opener = gzip.open if path.endswith(".gz") else open
      with opener(path, "rb") as f:
        head = f.read(200)
      if head.lstrip().startswith(b".so "):
        continue  # alias of another page
      parts = sections(render(path))
      summary = page_summary(parts.get("NAME", []))
      words = clean_words(parts.get("DESCRIPTION", []))
      if not summary or len(words) < MIN_WORDS:
        continue
      document = " ".join(words[:MAX_WORDS])
      key = (summary, document)
      if key in seen:
        continue
      seen.add(key)
      base = os.path.basename(path)
      base = base[:-3] if base.endswith(".gz") else base
      pages.append({"id": f"{package}/{base}", "package": package, "query": summary,
                    "document": document})
  pages.sort(key=lambda p: p["id"])
  return pages


def is_test(page_id: str) -> bool:
  digest = hashlib.sha256(page_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 100 < TEST_FRACTION_PERCENT


def _write_gz(path: str, text: str) -> None:
  # mtime=0 and no file name: the same input gives byte-identical output.
  with open(path, "wb") as raw:
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
      f.write(text.encode("utf-8"))


def write_dataset(pages: list[dict[str, str]], roots: dict[str, str], out: str) -> None:
  os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
  corpus = "".join(json.dumps({"_id": p["id"], "title": "", "text": p["document"]},
                              ensure_ascii=False) + "\n" for p in pages)
  queries = "".join(json.dumps({"_id": "q:" + p["id"], "text": p["query"]}, ensure_ascii=False)
                    + "\n" for p in pages)
  _write_gz(os.path.join(out, "corpus.jsonl.gz"), corpus)
  _write_gz(os.path.join(out, "queries.jsonl.gz"), queries)
  for split, want_test in (("train", False), ("test", True)):
    rows = [f"q:{p['id']}\t{p['id']}\t1\n" for p in pages if is_test(p["id"]) == want_test]
    with open(os.path.join(out, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as f:
      f.write("query-id\tcorpus-id\tscore\n" + "".join(rows))
  _write_gz(os.path.join(out, "train.tsv.gz"),
            "".join(f"{p['query']}\t{p['document']}\n" for p in pages if not is_test(p["id"])))
  copyrights = []
  for package, root in sorted(roots.items()):
    doc_dir = os.path.join(root, "usr/share/doc", package)
    if os.path.islink(doc_dir):
      # e.g. manpages-dev's doc dir is a link to manpages': same copyright file.
      copyrights.append(f"{'=' * 78}\nDebian package {package}: /usr/share/doc/{package} is a "
                        f"link to /usr/share/doc/{os.readlink(doc_dir)} (copyright above)\n\n")
      continue
    with open(os.path.join(doc_dir, "copyright"), encoding="utf-8") as f:
      copyrights.append(f"{'=' * 78}\nDebian package {package}: /usr/share/doc/{package}/"
                        f"copyright\n{'=' * 78}\n{f.read()}\n")
  _write_gz(os.path.join(out, "COPYRIGHT.txt.gz"), "".join(copyrights))


def train_vocabulary(pages: list[dict[str, str]], out: str) -> None:
  """Trains the demo SentencePiece (BPE) model with T5's special ids (pad=0, eos=1, unk=2)."""
  # BPE, not unigram: unigram's Viterbi ties (e.g. "X"+"XXX" vs "XXX"+"X") are broken
  # differently by TF-text's SentencePiece op and the Python library, so seqio's encode_tf and
  # encode disagreed on a few texts; BPE's merge order is the same in both.
  sentences = [p["document"] for p in pages] + [p["query"] for p in pages]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=VOCAB_SIZE,
      model_type="bpe", character_coverage=0.9995, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, input_sentence_size=0, shuffle_input_sentence=False, num_threads=2,
      max_sentence_length=20000)
  with open(os.path.join(out, "sentencepiece.model"), "wb") as f:
    f.write(model.getvalue())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="samtone_jax/tasks/data/manpages")
  parser.add_argument("--work_dir", default=None, help="where .debs are downloaded/unpacked")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    work_dir = args.work_dir or tmp
    os.makedirs(work_dir, exist_ok=True)
    roots = download_and_unpack(PACKAGES, work_dir)
    pages = extract_pages(roots)
    write_dataset(pages, roots, args.out)
    train_vocabulary(pages, args.out)
  counts = collections.Counter(p["package"] for p in pages)
  num_test = sum(is_test(p["id"]) for p in pages)
  print(f"{len(pages)} pages ({num_test} test) per package: {dict(counts)}; vocab {VOCAB_SIZE}")


if __name__ == "__main__":
  main()
