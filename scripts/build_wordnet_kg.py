"""Builds the embedded SKILL demo data: a small knowledge graph from WordNet 3.0, and questions.

The demo data (shipped in `samtone_jax/tasks/data/wordnet/`) is a real knowledge graph nobody on
this project wrote: WordNet's noun synsets, named by their first lemma, with five relations read
from WordNet's pointers and lemmas:

  relation        WordNet source                    example
  subclass_of     @  hypernym                       dog subclass_of canine
  has_part        %p part meronym                   car has_part accelerator
  has_member      %m member meronym                 Canidae has_member Canis
  made_from       %s substance meronym              bread made_from flour
  also_known_as   the synset's other lemmas         dog also_known_as Canis familiaris
                  (not those containing the name or contained in it: "domestic dog")

Steps (needs Debian's `wordnet-base` package: `apt-get install wordnet-base`):
  1. Read every noun synset of /usr/share/wordnet/data.noun (format: wndb(5WN)). A synset's
     name is its first lemma, underscores as spaces; a name that is the first lemma of two
     synsets is ambiguous, and facts about or pointing at such synsets are dropped, so every
     entity name in the KG means one synset.
  2. Draw subject synsets (seeded) from the lexicographer files in LEXFILES and add all their
     facts until the KG has about TARGET_TRIPLES triples.
  3. Ask MetaQA-style one-hop questions (`question with [entity]<TAB>answer|answer`) about every
     (subject, relation) of the KG ("what is [dog] a kind of") and every (object, relation)
     ("what is a kind of [canine]"); the answers are all the KG's entities that complete the
     fact. Templates are drawn (seeded) from two per relation and direction. Questions are
     split 80/10/10 into train/dev/test by a seeded shuffle (the split is by question).
  4. Write one KELM-style sentence per fact ("dog is a kind of canine."), and train a BPE
     SentencePiece model (T5 ids: pad=0, eos=1, unk=2, no BOS) on the KG, questions and
     sentences; tasks add T5's 100 sentinel ids on top.

Every step is deterministic (sorted inputs, fixed seed, gzip mtime 0, one SentencePiece thread),
so a rerun on the same WordNet gives byte-identical files.

Usage:
  python scripts/build_wordnet_kg.py --out samtone_jax/tasks/data/wordnet
"""

import argparse
import collections
import gzip
import io
import os
import random
import shutil

import sentencepiece as spm

WORDNET_DIR = "/usr/share/wordnet"
LICENSE_SOURCE = "/usr/share/doc/wordnet-base/copyright"
# Lexicographer files of the subjects (wndb lex_filenum): noun.animal, noun.artifact,
# noun.body, noun.food, noun.plant -- concrete things with parts, members and materials.
LEXFILES = {5: "noun.animal", 6: "noun.artifact", 8: "noun.body", 13: "noun.food",
            20: "noun.plant"}
POINTER_RELATIONS = {"@": "subclass_of", "%p": "has_part", "%m": "has_member",
                     "%s": "made_from"}
SYNONYM_RELATION = "also_known_as"
RELATIONS = ("subclass_of", "has_part", "has_member", "made_from", SYNONYM_RELATION)
TARGET_TRIPLES = 3000
SEED = 20221
SPLIT_PERCENT = {"train": 80, "dev": 10, "test": 10}
VOCAB_SIZE = 2000
# (forward templates: about the subject, answers are objects;
#  reverse templates: about the object, answers are subjects). "{}" is the [entity].
TEMPLATES = {
    "subclass_of": (("what is [{}] a kind of", "[{}] is a type of what"),
                    ("what is a kind of [{}]", "name a type of [{}]")),
    "has_part": (("what is a part of [{}]", "what parts does [{}] have"),
                 ("what is [{}] a part of", "[{}] is part of what")),
    "has_member": (("what is a member of [{}]", "which members does [{}] have"),
                   ("what group is [{}] a member of", "[{}] belongs to which group")),
    "made_from": (("what is [{}] made of", "what substance is in [{}]"),
                  ("what is made from [{}]", "what contains the substance [{}]")),
    "also_known_as": (("what is another name for [{}]", "[{}] is also called what"),
                      ("what is [{}] another name for", "[{}] is a synonym of what")),
}
SENTENCES = {"subclass_of": "{s} is a kind of {o}.", "has_part": "{s} has {o} as a part.",
             "has_member": "{s} has {o} as a member.", "made_from": "{s} is made from {o}.",
             "also_known_as": "{s} is also called {o}."}


def read_noun_synsets(path: str) -> dict[str, tuple[int, list[str], list[tuple[str, str]]]]:
  """data.noun -> {offset: (lex_filenum, lemmas, [(pointer symbol, target offset)])}.

  Line format (wndb(5WN)): offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt
  [pointer_symbol offset pos source/target]... | gloss. Lines starting with a space are the
  license header.
  """
  synsets = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith(" "):
        continue
      fields = line.split(" | ", 1)[0].split()
      offset, lex_filenum = fields[0], int(fields[1])
      word_count = int(fields[3], 16)
      lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(word_count)]
      position = 4 + 2 * word_count
      pointer_count = int(fields[position])
      pointers = []
      for i in range(pointer_count):
        symbol, target, pos, _ = fields[position + 1 + 4 * i:position + 5 + 4 * i]
        if pos == "n":
          pointers.append((symbol, target))
      synsets[offset] = (lex_filenum, lemmas, pointers)
  return synsets


def _usable(text: str) -> bool:
  # No character that the KG's TSV or MetaQA's brackets/pipes would misread.
  return text.strip() == text and text and not any(c in text for c in "\t|[]\n")


def _contains_either(a: str, b: str) -> bool:
  a, b = a.lower(), b.lower()
  return a in b or b in a


def build_kg(synsets) -> list[tuple[str, str, str]]:
  """The KG's triples, sorted by subject order of the seeded draw, then as WordNet lists them."""
  first_lemmas = collections.Counter(lemmas[0] for _, lemmas, _ in synsets.values())
  name = {offset: lemmas[0] for offset, (_, lemmas, _) in synsets.items()
          if first_lemmas[lemmas[0]] == 1 and _usable(lemmas[0])}
  candidates = sorted(offset for offset, (lexfile, _, _) in synsets.items()
                      if lexfile in LEXFILES and offset in name)
  random.Random(SEED).shuffle(candidates)
  triples, seen = [], set()
  for offset in candidates:
    _, lemmas, pointers = synsets[offset]
    facts = []
    for symbol, target in pointers:
      if symbol in POINTER_RELATIONS and target in name:
        facts.append((name[offset], POINTER_RELATIONS[symbol], name[target]))
    for lemma in lemmas[1:]:
      # An alias that contains the name or is contained in it ("Carcharias", "genus
      # Carcharias") can be guessed from the name alone; it would not test knowledge.
      if _usable(lemma) and not _contains_either(lemma, name[offset]):
        facts.append((name[offset], SYNONYM_RELATION, lemma))
    # A subject with only a hypernym adds little to ask about; keep ones with two or more facts.
    facts = [f for f in dict.fromkeys(facts) if f not in seen]
    if len(facts) < 2:
      continue
    triples.extend(facts)
    seen.update(facts)
    if len(triples) >= TARGET_TRIPLES:
      break
  return triples


def build_questions(triples) -> list[tuple[str, list[str]]]:
  """One question per (subject, relation) and per (object, relation), answers sorted."""
  forward, reverse = collections.defaultdict(list), collections.defaultdict(list)
  for subject, relation, obj in triples:
    forward[(subject, relation)].append(obj)
    reverse[(obj, relation)].append(subject)
  rng = random.Random(SEED + 1)
  questions = []
  for groups, direction in ((forward, 0), (reverse, 1)):
    for (entity, relation), answers in groups.items():
      template = rng.choice(TEMPLATES[relation][direction])
      questions.append((template.format(entity), sorted(set(answers))))
  texts = [q for q, _ in questions]
  assert len(set(texts)) == len(texts), "two questions with the same text"
  return questions


def split_questions(questions):
  order = list(range(len(questions)))
  random.Random(SEED + 2).shuffle(order)
  splits, start = {}, 0
  for index, (split, percent) in enumerate(SPLIT_PERCENT.items()):
    end = len(order) if index == len(SPLIT_PERCENT) - 1 else start + len(order) * percent // 100
    splits[split] = [questions[i] for i in sorted(order[start:end])]
    start = end
  return splits


def _write_gz(path: str, text: str) -> None:
  # mtime=0 and no file name: the same input gives byte-identical output.
  with open(path, "wb") as raw:
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
      f.write(text.encode("utf-8"))


def train_vocabulary(texts: list[str], out: str) -> None:
  """BPE (encode_tf and the Python library agree on it, see build_manpages_demo.py)."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=VOCAB_SIZE,
      model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=1)
  with open(os.path.join(out, "sentencepiece.model"), "wb") as f:
    f.write(model.getvalue())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="samtone_jax/tasks/data/wordnet")
  parser.add_argument("--wordnet_dir", default=WORDNET_DIR)
  args = parser.parse_args()
  data_noun = os.path.join(args.wordnet_dir, "data.noun")
  if not os.path.exists(data_noun):
    raise SystemExit(f"{data_noun} not found: apt-get install wordnet-base (or pass "
                     "--wordnet_dir)")
  os.makedirs(args.out, exist_ok=True)
  triples = build_kg(read_noun_synsets(data_noun))
  questions = build_questions(triples)
  splits = split_questions(questions)
  _write_gz(os.path.join(args.out, "kg.tsv.gz"),
            "".join(f"{s}\t{r}\t{o}\n" for s, r, o in triples))
  sentences = [SENTENCES[r].format(s=s, o=o) for s, r, o in triples]
  _write_gz(os.path.join(args.out, "sentences.tsv.gz"),
            "".join(f"{text}\t{s}\t{r}\t{o}\n" for text, (s, r, o) in zip(sentences, triples)))
  for split, rows in splits.items():
    _write_gz(os.path.join(args.out, f"qa_{split}.txt.gz"),
              "".join(f"{q}\t{'|'.join(a)}\n" for q, a in rows))
  texts = ([f"{s} {r.replace('_', ' ')} {o}" for s, r, o in triples] + sentences
           + [q.replace("[", "").replace("]", "") for q, _ in questions]
           + [a for _, answers in questions for a in answers])
  train_vocabulary(texts, args.out)
  shutil.copyfile(LICENSE_SOURCE, os.path.join(args.out, "COPYRIGHT.txt"))
  relations = collections.Counter(r for _, r, _ in triples)
  entities = {s for s, _, _ in triples} | {o for _, r, o in triples if r != SYNONYM_RELATION}
  print(f"{len(triples)} triples, {len(entities)} entities, relations {dict(relations)}; "
        f"questions {({k: len(v) for k, v in splits.items()})}; vocab {VOCAB_SIZE}")


if __name__ == "__main__":
  main()
