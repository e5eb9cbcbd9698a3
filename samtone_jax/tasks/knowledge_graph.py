"""Knowledge-graph triples and the SKILL objective (Moiseev et al., NAACL 2022) as seqio data.

SKILL infuses a knowledge graph into T5 by training on its triples directly: each fact
(subject, relation, object) becomes two seq2seq examples, one with the object masked and one with
the subject masked, as a single T5 sentinel span; the relation is kept:

  (Kismet, directed_by, William Dieterle)
    inputs  "Kismet directed by <extra_id_0>"     targets "<extra_id_0> William Dieterle"
    inputs  "<extra_id_0> directed by William Dieterle"   targets "<extra_id_0> Kismet"

(the targets follow T5's span-corruption convention: the sentinel, then the span). Relation names
have their underscores turned into spaces ("directed_by" -> "directed by"); the entity and
relation strings are otherwise kept as the file spells them.

The paper compares this with training on sentences that state the same facts (KELM); a
`fact sentences` file gives them, and each sentence is masked the same way (the subject or the
object, where the sentence spells it), so the two can be trained alone or as a seqio mixture.

File formats (plain or .gz; every malformed row raises `readers.DataFormatError` with its file
and 1-based line):

  TSV triples          subject<TAB>relation<TAB>object                  (one fact per line)
  MetaQA kb.txt        subject|relation|object                          (MetaQA's WikiMovies KB)
  WikiMovies KB        N subject relation object[, object...]           (movieqa/knowledge_source/
                       numbered lines (N = 1, 2, ... per movie),         wiki_entities/
                       movies separated by blank lines                   wiki_entities_kb.txt)
  fact sentences       sentence<TAB>subject<TAB>relation<TAB>object     (the sentence states it)
  KELM / TEKGEN        JSON Lines of the KELM corpus release (see `read_kelm_sentences`)

Records handed to tf.data (one per (fact, masked side), so every preprocessor maps one example
to one example, which `pipeline` needs to resume by skipping raw examples):

  triples:    {"subject", "relation", "object": str, "mask_subject": bool}
  sentences:  {"text": str, "span_start", "span_end": int64 byte offsets of the masked entity}
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import dataclasses
import re

from absl import logging
import seqio
import tensorflow as tf

from samtone_jax.tasks import features
from samtone_jax.tasks import preprocessors
from samtone_jax.tasks import readers
from samtone_jax.tasks import sources

SENTINEL = "<extra_id_0>"  # T5's first sentinel: the last id of a vocabulary with extra ids
SUBJECT, RELATION, OBJECT = "subject", "relation", "object"
MASK_SUBJECT = "mask_subject"
TEXT, SPAN_START, SPAN_END = "text", "span_start", "span_end"
# The relations of WikiMovies' wiki_entities_kb.txt. Their objects are comma-separated lists,
# except the free-text plot (which contains commas of its own).
WIKIMOVIES_RELATIONS = ("directed_by", "written_by", "starred_actors", "release_year",
                        "in_language", "has_tags", "has_genre", "has_imdb_rating",
                        "has_imdb_votes", "has_plot")
WIKIMOVIES_UNSPLIT_RELATIONS = ("has_plot",)
_WIKIMOVIES_RE = re.compile(r"^(\d+) (.+?) (" + "|".join(WIKIMOVIES_RELATIONS) + r") (.+)$")


@dataclasses.dataclass(frozen=True)
class Triple:
  subject: str
  relation: str
  object: str


def _check_triple(path: str, line: int, subject: str, relation: str, obj: str) -> Triple:
  return Triple(readers.check_text(path, line, SUBJECT, subject),
                readers.check_text(path, line, RELATION, relation),
                readers.check_text(path, line, OBJECT, obj))


def read_tsv_triples(path: str) -> Iterator[Triple]:
  """`subject<TAB>relation<TAB>object` lines, in file order."""
  for line, (subject, relation, obj) in readers.iter_tsv(path, 3):
    yield _check_triple(path, line, subject, relation, obj)


def read_metaqa_kb(path: str) -> Iterator[Triple]:
  """MetaQA's kb.txt: `subject|relation|object` lines (a blank line is an error)."""
  for line, text in readers.iter_lines(path):
    fields = text.split("|")
    if len(fields) != 3:
      raise readers.DataFormatError(
          path, line, f"expected 'subject|relation|object' (3 '|'-separated fields), got "
          f"{len(fields)} in {text[:80]!r}")
    yield _check_triple(path, line, *fields)


def read_wikimovies_kb(path: str) -> Iterator[Triple]:
  """WikiMovies' wiki_entities_kb.txt: numbered `N subject relation objects` lines.

  Lines of one movie are numbered 1, 2, ...; a blank line ends the movie. A list-valued object
  ("starred_actors Marlene Dietrich, Edward Arnold") gives one triple per item.
  """
  expected_number = 1
  for line, text in readers.iter_lines(path):
    if not text.strip():
      expected_number = 1
      continue
    match = _WIKIMOVIES_RE.match(text)
    if not match:
      raise readers.DataFormatError(
          path, line, "expected 'N subject relation object' with N a line number and relation "
          f"one of {', '.join(WIKIMOVIES_RELATIONS)}; got {text[:80]!r}")
    number, subject, relation, objects = match.groups()
    if int(number) != expected_number:
      raise readers.DataFormatError(
          path, line, f"line number {number} should be {expected_number} (the lines of a movie "
          "are numbered from 1; a blank line starts the next movie)")
    expected_number += 1
    items = ([objects] if relation in WIKIMOVIES_UNSPLIT_RELATIONS else objects.split(", "))
    for item in items:
      yield _check_triple(path, line, subject, relation, item)


KG_FORMATS: dict[str, Callable[[str], Iterator[Triple]]] = {
    "tsv": read_tsv_triples, "metaqa_kb": read_metaqa_kb, "wikimovies_kb": read_wikimovies_kb}


def read_triples(path: str, kg_format: str = "tsv") -> Iterator[Triple]:
  """Triples of a KG file in one of KG_FORMATS; raises ValueError for an unknown format."""
  if kg_format not in KG_FORMATS:
    raise ValueError(f"Unknown knowledge-graph format {kg_format!r}; one of {sorted(KG_FORMATS)}.")
  return KG_FORMATS[kg_format](path)


def masked_triples(triples: Iterable[Triple]) -> Iterator[dict]:
  """Both SKILL examples of every triple: object masked, then subject masked."""
  for triple in triples:
    for mask_subject in (False, True):
      yield {SUBJECT: triple.subject, RELATION: triple.relation, OBJECT: triple.object,
             MASK_SUBJECT: mask_subject}


def relation_text(relation: tf.Tensor) -> tf.Tensor:
  """A relation name as words: underscores become spaces ("directed_by" -> "directed by")."""
  return tf.strings.regex_replace(relation, "_", " ")


@seqio.map_over_dataset
def skill_mask_triple(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """One triple record -> {"inputs", "targets"} text with the subject or object as a sentinel.

  Args:
    example: {"subject", "relation", "object": string [], "mask_subject": bool []}.

  Returns:
    {"inputs": "subject relation <extra_id_0>" (or "<extra_id_0> relation object"),
     "targets": "<extra_id_0> object" (or "<extra_id_0> subject")}.
  """
  relation = relation_text(example[RELATION])
  mask_subject = example[MASK_SUBJECT]
  inputs = tf.where(mask_subject,
                    tf.strings.join([SENTINEL, relation, example[OBJECT]], separator=" "),
                    tf.strings.join([example[SUBJECT], relation, SENTINEL], separator=" "))
  masked = tf.where(mask_subject, example[SUBJECT], example[OBJECT])
  return {features.INPUTS: inputs,
          features.TARGETS: tf.strings.join([SENTINEL, masked], separator=" ")}


def _occurrences(text: bytes, part: bytes) -> Iterator[int]:
  start = text.find(part)
  while start >= 0:
    yield start
    start = text.find(part, start + 1)


def entity_spans(sentence: str, subject: str, obj: str) -> tuple[tuple[int, int], ...] | None:
  """UTF-8 byte spans ((start, end) of the subject, of the object) in `sentence`: the first
  occurrences that do not overlap (so "walrus" is not found inside "walrus mustache"), or None.
  """
  text, subject_bytes, object_bytes = (x.encode("utf-8") for x in (sentence, subject, obj))
  for s in _occurrences(text, subject_bytes):
    s_end = s + len(subject_bytes)
    for o in _occurrences(text, object_bytes):
      o_end = o + len(object_bytes)
      if o_end <= s or o >= s_end:
        return (s, s_end), (o, o_end)
  return None


def read_fact_sentences(path: str) -> Iterator[tuple[str, tuple[int, int], tuple[int, int]]]:
  """`sentence<TAB>subject<TAB>relation<TAB>object` lines -> (sentence, subject span, object
  span), byte spans as `entity_spans` finds them.

  Both entities must occur in the sentence, apart (that is what makes it state the fact).
  """
  for line, (sentence, subject, relation, obj) in readers.iter_tsv(path, 4):
    sentence = readers.check_text(path, line, "sentence", sentence)
    triple = _check_triple(path, line, subject, relation, obj)
    for field, entity in ((SUBJECT, triple.subject), (OBJECT, triple.object)):
      if entity not in sentence:
        raise readers.DataFormatError(path, line, f"the {field} {entity!r} does not occur in "
                                      f"the sentence {sentence[:80]!r}")
    spans = entity_spans(sentence, triple.subject, triple.object)
    if spans is None:
      raise readers.DataFormatError(path, line, f"the subject {triple.subject!r} and the object "
                                    f"{triple.object!r} only occur overlapping in the sentence")
    yield sentence, spans[0], spans[1]


def masked_sentences(sentences: Iterable[tuple[str, tuple[int, int], tuple[int, int]]]
                     ) -> Iterator[dict]:
  """Both masked examples of every fact sentence: its object span, then its subject span."""
  for sentence, subject_span, object_span in sentences:
    for start, end in (object_span, subject_span):
      yield {TEXT: sentence, SPAN_START: start, SPAN_END: end}


# The KELM corpus (Agarwal et al., NAACL 2021; https://github.com/google-research-datasets/
# KELM-corpus, release "updated-2021"): JSON Lines, one object per line, with
#   "triples":            a list of [subject, relation, object] (or 4-item "quadruples" for a fact
#                         with a sub-property, e.g. ["Person X", "Award Y", "received on",
#                         "Date Z"]); missing in about 0.1% of kelm_generated_corpus.jsonl;
#   "serialized_triples": the triples as one string, "<subject> <relation> <object> <relation2>
#                         <object2> ...", the data-to-text model's input (no entity boundaries:
#                         not read here);
#   "gen_sentence" (kelm_generated_corpus.jsonl, the ~15M synthetic sentences) or "sentence"
#                         (quadruples-{train,validation,test}.tsv, TEKGEN's Wikipedia sentences;
#                         JSON Lines despite the name).
KELM_SENTENCE_FIELDS = {"kelm": "gen_sentence", "tekgen": "sentence"}
KELM_TRIPLES = "triples"


@dataclasses.dataclass
class KelmCounts:
  """What `read_kelm_sentences` read, masked and skipped (it logs them as one warning).

  Attributes:
    lines: non-blank lines read.
    lines_without_triples: lines with no (or an empty) "triples" field, skipped (the release
      documents ~0.1% of kelm_generated_corpus.jsonl without one).
    entities: distinct entity strings over all lines (per line: each triple's first and last item).
    entities_not_in_sentence: entities the sentence does not spell exactly (case-sensitive
      substring), not masked (the generator paraphrases dates, units, ...).
    entities_overlapping: entities that occur only inside a longer entity's masked span, not
      masked ("walrus" inside "walrus mustache").
    lines_without_masked_entity: lines with triples but no maskable entity, skipped.
    examples: masked examples produced (one per masked entity).
  """

  lines: int = 0
  lines_without_triples: int = 0
  entities: int = 0
  entities_not_in_sentence: int = 0
  entities_overlapping: int = 0
  lines_without_masked_entity: int = 0
  examples: int = 0


def _kelm_entities(path: str, line: int, triples: object) -> list[str]:
  """The distinct entity strings of one line's "triples", in order: each item's first (subject)
  and last (object, or the sub-property's value of a quadruple) string.

  A quadruple's middle items are not entities under every reading of the release's description
  ("(Person X, Award Y, received on, Date Z)": object and sub-property, or relation and
  sub-property), so they are never masked; first and last are entities under all of them.
  """
  if not isinstance(triples, list):
    raise readers.DataFormatError(path, line, f"field {KELM_TRIPLES!r} should be a list of "
                                  f"triples, got {type(triples).__name__}")
  entities = []
  for index, triple in enumerate(triples):
    if (not isinstance(triple, list) or len(triple) not in (3, 4)
        or not all(isinstance(item, str) for item in triple)):
      raise readers.DataFormatError(
          path, line, f"{KELM_TRIPLES}[{index}] should be a list of 3 strings (subject, "
          f"relation, object) or 4 (a quadruple), got {str(triple)[:80]}")
    for item in (triple[0], triple[-1]):
      entity = readers.check_text(path, line, f"{KELM_TRIPLES}[{index}]", item)
      if entity not in entities:
        entities.append(entity)
  return entities


def kelm_entity_spans(sentence: str, entities: Sequence[str]
                      ) -> tuple[list[tuple[int, int]], int, int]:
  """UTF-8 byte spans of the entities a sentence spells, left to right.

  Longer entities claim their first occurrence first; each entity then takes its first
  occurrence that overlaps no claimed span (so "walrus" is not found inside "walrus mustache").
  Matching is exact (case-sensitive substrings), as for the fact-sentence TSV.

  Returns:
    (spans sorted by start, number of entities not in the sentence, number that occur only
    overlapping a longer entity's span).
  """
  text = sentence.encode("utf-8")
  spans, missing, overlapping = [], 0, 0
  for entity in sorted(entities, key=lambda e: -len(e.encode("utf-8"))):  # stable: ties in order
    part = entity.encode("utf-8")
    starts = list(_occurrences(text, part))
    if not starts:
      missing += 1
      continue
    free = [s for s in starts if all(s + len(part) <= a or s >= b for a, b in spans)]
    if not free:
      overlapping += 1
      continue
    spans.append((free[0], free[0] + len(part)))
  return sorted(spans), missing, overlapping


def read_kelm_sentences(path: str, sentence_format: str = "kelm",
                        counts: KelmCounts | None = None
                        ) -> Iterator[tuple[str, tuple[tuple[int, int], ...]]]:
  """A KELM release file -> (sentence, byte spans of its maskable entities, left to right).

  Args:
    path: kelm_generated_corpus.jsonl ("kelm") or quadruples-*.tsv ("tekgen"), plain or .gz.
    sentence_format: "kelm" reads the sentence from "gen_sentence", "tekgen" from "sentence".
    counts: filled in as the file is read (a fresh KelmCounts if None); logged as one warning
      at the end when anything was skipped.

  Yields:
    (sentence, spans) for each line with at least one maskable entity (`kelm_entity_spans`).

  Raises:
    readers.DataFormatError: naming file and line: invalid JSON, not an object, a missing or
      empty sentence, "triples" not a list of 3- or 4-string lists, an empty entity; or, at the
      end, a file in which no line has a maskable entity.
  """
  if sentence_format not in KELM_SENTENCE_FIELDS:
    raise ValueError(f"Unknown KELM format {sentence_format!r}; one of "
                     f"{sorted(KELM_SENTENCE_FIELDS)}.")
  field = KELM_SENTENCE_FIELDS[sentence_format]
  counts = KelmCounts() if counts is None else counts
  for line, obj in readers.iter_jsonl(path, required={field: str}):
    counts.lines += 1
    sentence = readers.check_text(path, line, field, obj[field])
    if not obj.get(KELM_TRIPLES):
      counts.lines_without_triples += 1
      continue
    entities = _kelm_entities(path, line, obj[KELM_TRIPLES])
    spans, missing, overlapping = kelm_entity_spans(sentence, entities)
    counts.entities += len(entities)
    counts.entities_not_in_sentence += missing
    counts.entities_overlapping += overlapping
    if not spans:
      counts.lines_without_masked_entity += 1
      continue
    counts.examples += len(spans)
    yield sentence, tuple(spans)
  if not counts.examples:
    raise readers.DataFormatError(
        path, None, f"no line has a {field!r} that spells one of its triples' entities (read "
        f"{counts.lines} lines, {counts.lines_without_triples} without {KELM_TRIPLES!r}); is "
        f"this a KELM release file in the {sentence_format!r} format?")
  if counts.lines_without_triples or counts.lines_without_masked_entity:
    logging.warning(
        "%s: %d masked examples from %d lines; skipped %d lines without triples and %d whose "
        "sentence spells none of their entities; %d of %d entities not in their sentence, %d "
        "only inside a longer entity.", path, counts.examples, counts.lines,
        counts.lines_without_triples, counts.lines_without_masked_entity,
        counts.entities_not_in_sentence, counts.entities, counts.entities_overlapping)


def masked_spans(sentences: Iterable[tuple[str, Sequence[tuple[int, int]]]]) -> Iterator[dict]:
  """One masked example per (sentence, span): the records `skill_mask_sentence` takes."""
  for sentence, spans in sentences:
    for start, end in spans:
      yield {TEXT: sentence, SPAN_START: start, SPAN_END: end}


# Fact-sentence file formats: "tsv" (sentence<TAB>subject<TAB>relation<TAB>object) and the KELM
# release's two JSON Lines files.
SENTENCE_FORMATS = ("tsv", *KELM_SENTENCE_FIELDS)


def sentence_records(path: str, sentence_format: str = "tsv") -> Iterator[dict]:
  """The masked-sentence records of a fact-sentence file in one of SENTENCE_FORMATS."""
  if sentence_format == "tsv":
    return masked_sentences(read_fact_sentences(path))
  return masked_spans(read_kelm_sentences(path, sentence_format))


@seqio.map_over_dataset
def skill_mask_sentence(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """{"text", "span_start", "span_end"} -> text with the span as a sentinel; targets the span.

  "Kismet was directed by William Dieterle." with the object span ->
    inputs "Kismet was directed by <extra_id_0>."   targets "<extra_id_0> William Dieterle"
  """
  text, start, end = example[TEXT], example[SPAN_START], example[SPAN_END]
  before = tf.strings.substr(text, tf.constant(0, start.dtype), start)
  span = tf.strings.substr(text, start, end - start)
  after = tf.strings.substr(text, end, tf.cast(tf.strings.length(text), end.dtype) - end)
  return {features.INPUTS: tf.strings.join([before, SENTINEL, after]),
          features.TARGETS: tf.strings.join([SENTINEL, span], separator=" ")}


TRIPLE_SPEC = {SUBJECT: sources.STRING, RELATION: sources.STRING, OBJECT: sources.STRING,
               MASK_SUBJECT: sources.BOOL}
SENTENCE_SPEC = {TEXT: sources.STRING, SPAN_START: sources.INT64, SPAN_END: sources.INT64}


def check_sentinel(vocabulary: seqio.Vocabulary, name: str) -> None:
  """Raises ValueError unless `vocabulary` encodes SENTINEL as one id (it needs extra ids)."""
  if getattr(vocabulary, "extra_ids", 0) < 1:
    raise ValueError(f"Task {name!r}: the SKILL objective masks spans with the T5 sentinel "
                     f"{SENTINEL}, so its vocabulary needs extra ids (e.g. "
                     "seqio.SentencePieceVocabulary(path, extra_ids=100)); this one has none.")


def register_skill_task(name: str, kg_path: str | Callable[[], str], vocabulary: seqio.Vocabulary,
                        *, kg_format: str = "tsv", drop_relations: Sequence[str] = (),
                        shuffle_buffer_size: int = 100_000) -> seqio.Task:
  """Registers (replacing any earlier one) a SKILL task over a KG file: split "train".

  Args:
    name: task name.
    kg_path: the KG file, or a function returning it (called when the dataset is built, so a
      directory configured after registration is honoured; it may raise MissingDataError).
    vocabulary: a vocabulary with extra ids (the sentinel).
    kg_format: one of KG_FORMATS.
    drop_relations: relations left out (e.g. WikiMovies' "has_plot", a paragraph, not an entity).
    shuffle_buffer_size: the pipeline's shuffle buffer.

  Returns:
    the task: features "inputs", "targets" (token ids, EOS-terminated, trimmed to the lengths).
  """
  check_sentinel(vocabulary, name)
  if kg_format not in KG_FORMATS:
    raise ValueError(f"Unknown knowledge-graph format {kg_format!r}; one of {sorted(KG_FORMATS)}.")
  resolve = kg_path if callable(kg_path) else (lambda: kg_path)
  drop = frozenset(drop_relations)

  def records(path):
    return masked_triples(t for t in read_triples(path, kg_format) if t.relation not in drop)

  source = sources.file_records_source({"train": resolve}, records, TRIPLE_SPEC)
  return _register(name, source, skill_mask_triple, vocabulary, shuffle_buffer_size)


def register_fact_sentences_task(name: str, path: str | Callable[[], str],
                                 vocabulary: seqio.Vocabulary, *, sentence_format: str = "tsv",
                                 shuffle_buffer_size: int = 100_000) -> seqio.Task:
  """Registers a KELM-style task: fact sentences with the subject or object masked ("train").

  Args:
    name: task name.
    path: the file, or a function returning it (called when the dataset is built).
    vocabulary: a vocabulary with extra ids (the sentinel).
    sentence_format: one of SENTENCE_FORMATS: "tsv" (our sentence<TAB>subject<TAB>relation<TAB>
      object; both entities masked, one example each), "kelm" (kelm_generated_corpus.jsonl) or
      "tekgen" (the KELM release's quadruples-*.tsv): every entity the sentence spells masked,
      one example each (`read_kelm_sentences`).
    shuffle_buffer_size: the pipeline's shuffle buffer.
  """
  check_sentinel(vocabulary, name)
  if sentence_format not in SENTENCE_FORMATS:
    raise ValueError(f"Unknown fact-sentence format {sentence_format!r}; one of "
                     f"{list(SENTENCE_FORMATS)}.")
  resolve = path if callable(path) else (lambda: path)
  source = sources.file_records_source(
      {"train": resolve}, lambda p: sentence_records(p, sentence_format), SENTENCE_SPEC)
  return _register(name, source, skill_mask_sentence, vocabulary, shuffle_buffer_size)


def _register(name: str, source: seqio.DataSource, mask_fn, vocabulary: seqio.Vocabulary,
              shuffle_buffer_size: int) -> seqio.Task:
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[mask_fn, preprocessors.tokenize_trim_append_eos],
      output_features=preprocessors.seq2seq_output_features(vocabulary),
      shuffle_buffer_size=shuffle_buffer_size)


def register_mixture(name: str, tasks: Sequence[tuple[str, float]]) -> seqio.Mixture:
  """Registers (replacing any earlier one) a mixture of tasks with rates, e.g. triples and
  sentences."""
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks))
