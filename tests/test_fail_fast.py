"""Every error a user can cause ends the command within seconds: one message, exit status 1.

Each bad input runs `python -m samtone_jax.main` / `.evaluate` in a subprocess with a timeout (a
hang fails the test), and the test asserts the exit status, the message (file / line / binding /
step and what to do) and that MODEL_DIR holds nothing half-written. One tiny run (module fixture,
checkpoints at steps 2 and 4) serves the checkpoint cases: two trainers on one MODEL_DIR, a
checkpoint truncated at each of its files, the fallback to the newest intact step (bit-identical
to the uninterrupted run), a restore into the wrong architecture.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from samtone_jax import checkpoints
from samtone_jax import errors
from samtone_jax import gin_config
from samtone_jax import partitioning
from samtone_jax import run_lock
from samtone_jax import train_step as train_step_lib
from samtone_jax.models import config as model_config_lib
from samtone_jax.tasks import vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/demo_samtone.gin"
TRAIN_STEPS = 4
OVERRIDES = (  # gin syntax, as after --gin.
    f"TRAIN_STEPS={TRAIN_STEPS}",
    "BATCH_SIZE=16",
    'TASK_FEATURE_LENGTHS={"queries": 8, "passages": 16}',
    "EVAL_TASKS=[]",
    "WARMUP_STEPS=2",
    "config.T5Config.num_layers=1",
    "trainer.LoopConfig.log_period=1",
    "trainer.LoopConfig.checkpoint_period=2",
)
TIMEOUT = 120  # seconds; a process that has not exited by then has hung
# The tiny model of OVERRIDES on the demo experiment (for in-process restores).
TINY_MODEL = model_config_lib.DualEncoderConfig(
    encoder=model_config_lib.T5Config(vocab_size=8000, d_model=64, d_ff=128, num_heads=4,
                                      num_layers=1, d_kv=16),
    projection_dim=64)

# BEIR directories under $SAMTONE_DATA_DIR/beir/<name>/, one per data-error class.
_CORPUS = [{"_id": "d1", "title": "cp", "text": "copy files"},
           {"_id": "d2", "title": "ls", "text": "list directory contents"}]
_QUERIES = [{"_id": "q1", "text": "copy a file"}, {"_id": "q2", "text": "list files"}]
_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n"


def _jsonl(rows):
  return "".join(json.dumps(r) + "\n" for r in rows)


BEIR_SETS = {
    "good": {},
    "dup_doc": {"corpus.jsonl": _jsonl(_CORPUS + [_CORPUS[0]])},
    "empty_doc": {"corpus.jsonl": _jsonl(_CORPUS + [{"_id": "d3", "title": "", "text": " "}])},
    "float_score": {"qrels/train.tsv": _QRELS + "q1\td2\t1.5\n"},
    "zero_scores": {"qrels/train.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t0\nq2\td2\t0\n"},
    "empty_corpus": {"corpus.jsonl": "", "qrels/train.tsv": "query-id\tcorpus-id\tscore\n"},
    "unknown_query": {"qrels/train.tsv": _QRELS + "q9\td1\t1\n"},
    "bad_json": {"queries.jsonl": _jsonl(_QUERIES) + '{"_id": "q3", "text": \n'},
    "no_queries": {"queries.jsonl": None},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: our code, the BEIR sets, a shared compilation cache."""
  data = tmp_path_factory.mktemp("data")
  for name, overrides in BEIR_SETS.items():
    files = {"corpus.jsonl": _jsonl(_CORPUS), "queries.jsonl": _jsonl(_QUERIES),
             "qrels/train.tsv": _QRELS, **overrides}
    for relative, text in files.items():
      if text is not None:
        path = data / "beir" / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", SAMTONE_DATA_DIR=str(data),
              SAMTONE_VOCAB_PATH=vocab.DEMO_VOCAB_PATH, JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _train_command(model_dir, *extra, overrides=OVERRIDES):
  return [sys.executable, "-m", "samtone_jax.main", f"--gin_file={EXPERIMENT}",
          f'--gin.MODEL_DIR="{model_dir}"', *[f"--gin.{o}" for o in overrides], *extra]


def _evaluate_command(checkpoint_path, *extra):
  return [sys.executable, "-m", "samtone_jax.evaluate", f"--gin_file={EXPERIMENT}",
          f'--gin.CHECKPOINT_PATH="{checkpoint_path}"', '--gin.EVAL_TASKS=["demo_manpages_test"]',
          "--gin.config.T5Config.num_layers=1", *extra]


def _run(command, env, **env_overrides):
  start = time.time()
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT,
                          env={**env, **env_overrides})
  return result, time.time() - start


def _files(directory):
  """{relative path: size} of everything under `directory` ({} if it does not exist)."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = os.path.getsize(path)
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env):
  """A tiny run of TRAIN_STEPS steps, checkpoints at 2 and 4; returns its directory and the
  final parameters."""
  model_dir = str(tmp_path_factory.mktemp("trained") / "run")
  result, _ = _run(_train_command(model_dir), env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoints.checkpoint_steps(model_dir) == [2, 4]
  assert not os.path.exists(run_lock.lock_path(model_dir))  # released at exit
  return model_dir, _final_params(model_dir)


def _abstract_params():
  return {"model": train_step_lib.abstract_model_params_of(TINY_MODEL,
                                                            partitioning.create_mesh())}


def _final_params(path):
  params = checkpoints.restore_params(path, _abstract_params())
  return jax.tree.map(np.asarray, jax.device_get(params))


def _copy_run(trained_dir, tmp_path, name="copy"):
  target = str(tmp_path / name)
  shutil.copytree(trained_dir, target)
  return target


# ---- the table: (id, command kind, extra args, env overrides, expected message parts) --------

V8100 = "--gin.config.T5Config.vocab_size=8100"  # the demo vocabulary + T5's 100 extra ids
CASES = [
    # gin and flags
    ("misspelled_macro", "train", ["--gin.TRAIN_STEP=1"], {},
     ["macro TRAIN_STEP", "did you mean TRAIN_STEPS?"]),
    ("misspelled_parameter", "train", ["--gin.losses.LossConfig.temprature=0.5"], {},
     ["Error in the gin configuration", "temprature"]),
    ("missing_gin_file", "train", ["--gin_file=experiments/no_such.gin"], {},
     ["Error in the gin configuration", "no_such.gin"]),
    ("binding_without_value", "train", ["--gin.BATCH_SIZE"], {}, ["--gin.NAME=VALUE"]),
    ("batch_size_0", "train", ["--gin.BATCH_SIZE=0"], {},
     ["BATCH_SIZE (trainer.DataConfig.batch_size) = 0", "positive integer"]),
    ("batch_size_negative", "train", ["--gin.BATCH_SIZE=-8"], {},
     ["BATCH_SIZE (trainer.DataConfig.batch_size) = -8"]),
    ("batch_size_not_divisible", "train", ["--gin.BATCH_SIZE=12"], {},
     ["BATCH_SIZE = 12 is not divisible", "multiple of 8"]),
    ("length_0", "train", ['--gin.TASK_FEATURE_LENGTHS={"queries": 0, "passages": 16}'], {},
     ["TASK_FEATURE_LENGTHS['queries'] = 0"]),
    ("train_steps_negative", "train", ["--gin.TRAIN_STEPS=-5"], {},
     ["TRAIN_STEPS (trainer.LoopConfig.train_steps) = -5: expected 0 or more"]),
    ("bad_mesh", "train", ["--gin.trainer.train.mesh_shape=(3, 1)"], {},
     ["trainer.train.mesh_shape = (3, 1)"]),
    ("unknown_task", "train", ['--gin.MIXTURE_OR_TASK_NAME="demo_manpage"'], {},
     ["MIXTURE_OR_TASK_NAME = 'demo_manpage'", "did you mean 'demo_manpages'"]),
    ("hard_negatives_task_has_none", "train", ["--gin.losses.LossConfig.use_hard_negatives=True"],
     {}, ["LossConfig.use_hard_negatives=True but task 'demo_manpages' has no 'negatives' feature",
          "losses/samtone.gin"]),
    ("unknown_eval_set", "train", ['--gin.EVAL_TASKS=["demo_manpages_tst"]'], {},
     ["EVAL_TASKS names 'demo_manpages_tst'", "did you mean 'demo_manpages_test'"]),
    # vocabularies
    ("vocabulary_missing", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_good_train"', V8100],
     {"SAMTONE_VOCAB_PATH": "/nonexistent/spm.model"},
     ["Missing SentencePiece vocabulary of task 'beir_good_train'", "/nonexistent/spm.model",
      "SAMTONE_VOCAB_PATH", "vocabulary_paths"]),
    # No network here: the gs:// lookup fails at once ("unreachable"); with a network, the bucket
    # does not exist. Either way: what, where, and how to get it.
    ("vocabulary_gs_unreachable", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_good_train"', V8100],
     {"SAMTONE_VOCAB_PATH": "gs://samtone-no-such-bucket-i11/spm.model"},
     ["Missing SentencePiece vocabulary", "gs://samtone-no-such-bucket-i11/spm.model",
      "storage.googleapis.com/t5-data"]),
    ("vocab_size_too_small", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_good_train"'], {},
     ["has 8100 ids (8000 pieces + 100 extra ids)", "config.T5Config.vocab_size = 8000",
      "--gin.config.T5Config.vocab_size=8100"]),
    # data (raised inside tf.data; the process must still exit)
    ("duplicate_document_id", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_dup_doc_train"', V8100],
     {}, ["dup_doc/corpus.jsonl, line 3: duplicate document id 'd1'"]),
    ("empty_document", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_empty_doc_train"', V8100], {},
     ["empty_doc/corpus.jsonl, line 3: empty text in document 'd3'"]),
    ("fractional_score", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_float_score_train"', V8100],
     {}, ["float_score/qrels/train.tsv, line 4: score should be an integer, got '1.5'"]),
    ("all_scores_zero", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_zero_scores_train"', V8100],
     {}, ["zero_scores/qrels/train.tsv: no training pair", "none of its 2 judgements"]),
    ("empty_corpus", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_empty_corpus_train"', V8100],
     {}, ["empty_corpus/qrels/train.tsv: no training pair", "corpus: 0 documents"]),
    ("unknown_query_id", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_unknown_query_train"', V8100],
     {}, ["unknown_query/qrels/train.tsv, line 4: query-id 'q9' is not in the queries"]),
    ("bad_json", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_bad_json_train"', V8100], {},
     ["bad_json/queries.jsonl, line 3: invalid JSON"]),
    ("missing_file", "train", ['--gin.MIXTURE_OR_TASK_NAME="beir_no_queries_train"', V8100], {},
     ["Missing BEIR file (queries.jsonl or queries.jsonl.gz)", "no_queries/queries.jsonl",
      "Download a BEIR dataset"]),
    # evaluate
    ("evaluate_no_checkpoint", "evaluate", [], {},
     ["No samtone_jax or t5x checkpoint under", "CHECKPOINT_PATH"]),
    ("evaluate_unknown_set", "evaluate", ['--gin.EVAL_TASKS=["beir_nope_test"]'], {},
     ["EVAL_TASKS names 'beir_nope_test'"]),
]


def _run_case(case, tmp_path, env):
  name, kind, extra, env_overrides, expected = case
  directory = str(tmp_path / name)
  if kind == "train":
    command = _train_command(directory, *extra)
  else:
    command = _evaluate_command(directory, *extra)
  result, seconds = _run(command, env, **env_overrides)
  return name, directory, result, seconds, expected


def test_bad_inputs_exit_with_one_message(tmp_path, env):
  """25 classes of bad input: exit 1 within the timeout, the message, no traceback, nothing
  half-written. Two at a time: each process is mostly imports on one core."""
  assert len(CASES) >= 20
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outcomes = list(pool.map(lambda case: _run_case(case, tmp_path, env), CASES))
  failures = []
  for name, directory, result, seconds, expected in outcomes:
    stderr = result.stderr
    problems = [f"missing {part!r}" for part in expected if part not in stderr]
    if result.returncode != 1:
      problems.append(f"exit status {result.returncode}")
    if "Traceback" in stderr:
      problems.append("a traceback")
    if _files(directory):
      problems.append(f"left files in MODEL_DIR: {sorted(_files(directory))}")
    if problems:
      failures.append(f"{name} ({seconds:.0f} s): {', '.join(problems)}\n{stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)


def test_macros_bound_on_the_command_line_must_be_known():
  try:
    # A new macro is fine when a binding uses it; an existing one may be overridden.
    gin_config.parse_gin([EXPERIMENT], ["MY_STEPS = 7", "TRAIN_STEPS = %MY_STEPS", "BATCH_SIZE = 8"])
    assert gin.query_parameter("%TRAIN_STEPS").scoped_selector == "MY_STEPS/gin.macro"
    gin.clear_config()
    with pytest.raises(errors.ConfigError, match="macro BATCH_SIZ is bound .* did you mean "
                       "BATCH_SIZE"):
      gin_config.parse_gin([EXPERIMENT], ["BATCH_SIZ = 8"])
  finally:
    gin.clear_config()


def test_debug_and_verbose_show_the_traceback(tmp_path, env):
  for extra, env_overrides in ((["--verbose"], {}), ([], {"SAMTONE_DEBUG": "1"})):
    result, _ = _run(_train_command(str(tmp_path / "run"), "--gin.TRAIN_STEP=1", *extra), env,
                     **env_overrides)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "did you mean TRAIN_STEPS?" in result.stderr


def test_train_steps_below_the_checkpoint_changes_nothing(trained, tmp_path, env):
  model_dir = _copy_run(trained[0], tmp_path)
  before = _files(model_dir)
  result, _ = _run(_train_command(model_dir, "--gin.TRAIN_STEPS=3"), env)
  assert result.returncode == 1, result.stderr[-2000:]
  assert (f"TRAIN_STEPS = 3, but {model_dir} already has a checkpoint at step 4: raise "
          "TRAIN_STEPS to at least 4") in result.stderr
  assert _files(model_dir) == before
  result, _ = _run(_train_command(model_dir), env)  # TRAIN_STEPS = 4: already complete
  assert result.returncode == 0, result.stderr[-2000:]
  assert "is already complete: its checkpoint is at step 4 = TRAIN_STEPS" in result.stdout
  assert checkpoints.checkpoint_steps(model_dir) == [2, 4]


def test_wrong_architecture_is_named(trained, env):
  result, _ = _run(_evaluate_command(trained[0], "--gin_file=architectures/ade.gin"), env)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "does not fit the configured model: likely the tower sharing differs" in result.stderr
  assert ("parameter groups: checkpoint model/encoder, model/projection, model/token_embedder; "
          "model model/document_encoder") in result.stderr
  # In-process: a wider projection is named with both sizes.
  wide = model_config_lib.DualEncoderConfig(encoder=TINY_MODEL.encoder, projection_dim=32)
  abstract = {"model": train_step_lib.abstract_model_params_of(wide, partitioning.create_mesh())}
  with pytest.raises(errors.CheckpointError,
                     match=r"projection size differs .*checkpoint 64, model 32"):
    checkpoints.restore_params(trained[0], abstract)


# ---- two trainers, stale locks ----------------------------------------------------------------

def test_second_trainer_refuses_and_first_is_unaffected(trained, tmp_path, env):
  model_dir = str(tmp_path / "shared")
  first = subprocess.Popen(_train_command(model_dir), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
  try:
    deadline = time.time() + TIMEOUT
    while getattr(run_lock.read_lock(run_lock.lock_path(model_dir)), "pid", None) != first.pid:
      assert time.time() < deadline and first.poll() is None, "the first trainer took no lock"
      time.sleep(0.2)
    # Frozen while holding the lock, so that the second one meets it whatever the timing.
    first.send_signal(signal.SIGSTOP)
    result, seconds = _run(_train_command(model_dir), env)
    first.send_signal(signal.SIGCONT)
    assert result.returncode == 1, result.stderr[-2000:]
    assert (f"MODEL_DIR {model_dir} is in use by another trainer (host {socket.gethostname()}, "
            f"pid {first.pid}") in result.stderr
    assert seconds < 60
    output, stderr = first.communicate(timeout=TIMEOUT)
  finally:
    first.kill()
  assert first.returncode == 0, stderr[-3000:]
  assert f"Finished at step {TRAIN_STEPS}" in output
  assert not os.path.exists(run_lock.lock_path(model_dir))
  jax.tree.map(np.testing.assert_array_equal, _final_params(model_dir), trained[1])


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  os.makedirs(model_dir)
  path = run_lock.lock_path(model_dir)
  now = time.time()

  def write(**fields):
    info = {"host": socket.gethostname(), "pid": os.getppid(), "started": now - 50,
            "heartbeat": now - 5, "token": "other", **fields}
    with open(path, "w") as f:
      json.dump(info, f)

  write()  # a live process (our parent) with a fresh heartbeat
  with pytest.raises(errors.RunDirectoryLockedError, match=f"pid {os.getppid()}"):
    run_lock.acquire(model_dir)
  for fields, reason in (({"pid": _dead_pid()}, "on this host is gone"),
                         ({"host": "another-host", "heartbeat": now - 4000},
                          "heartbeat is 4000 s old")):
    write(**fields)
    with run_lock.hold(model_dir):
      held = run_lock.read_lock(path)
      assert (held.pid, held.host) == (os.getpid(), socket.gethostname())
    assert reason in capsys.readouterr().out
    assert not os.path.exists(path)


def test_lock_on_an_object_store(monkeypatch):
  """ram:// stands for gs:// (no exclusive create): written, read back, refused to a second."""
  monkeypatch.setattr(run_lock, "SETTLE_SECONDS", 0.1)
  model_dir = f"ram://fail_fast_lock_{time.time_ns()}/run"
  with run_lock.hold(model_dir):
    held = run_lock.read_lock(run_lock.lock_path(model_dir))
    assert held.pid == os.getpid()
    run_lock._HELD.clear()  # pylint: disable=protected-access  (as if another process)
    try:
      with pytest.raises(errors.RunDirectoryLockedError, match=f"pid {os.getpid()}"):
        run_lock.acquire(model_dir)
    finally:
      run_lock._HELD[run_lock.lock_path(model_dir)] = held.token  # pylint: disable=protected-access
  assert run_lock.read_lock(run_lock.lock_path(model_dir)) is None


def test_heartbeat_is_refreshed(tmp_path):
  model_dir = str(tmp_path / "run")
  with run_lock.hold(model_dir, heartbeat_seconds=0.2):
    first = run_lock.read_lock(run_lock.lock_path(model_dir)).heartbeat
    time.sleep(1.0)
    later = run_lock.read_lock(run_lock.lock_path(model_dir)).heartbeat
  assert later - first >= 0.2


# ---- damaged checkpoints ----------------------------------------------------------------------

def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def test_truncated_checkpoint_files_are_named(trained, tmp_path):
  model_dir = _copy_run(trained[0], tmp_path)
  step_dir = os.path.join(checkpoints.checkpoint_dir(model_dir), "4")
  names = sorted(_files(step_dir))
  assert checkpoints.FILES_MANIFEST in names and len(names) > 10
  abstract = _abstract_params()
  for name in names:
    path = os.path.join(step_dir, name)
    original = open(path, "rb").read()
    _truncate(path)
    expected = f"Checkpoint {step_dir} is damaged: {path}"
    try:
      with pytest.raises(errors.CheckpointError) as resume_error:  # what resuming runs first
        checkpoints.choose_resume_step(model_dir)
      with pytest.raises(errors.CheckpointError) as restore_error:  # evaluate, encode, init
        checkpoints.restore_params(model_dir, abstract)
    finally:
      with open(path, "wb") as f:
        f.write(original)
    for error in (resume_error.value, restore_error.value):
      message = str(error)
      assert message.startswith(expected), (name, message)
      assert "The newest intact earlier checkpoint is step 2" in message, message
    assert "trainer.LoopConfig.resume_fallback=True" in str(resume_error.value)
  # Without files.json (a checkpoint from before it existed), orbax's own failure is reported.
  os.remove(os.path.join(step_dir, checkpoints.FILES_MANIFEST))
  _truncate(os.path.join(step_dir, "state", "_METADATA"))
  with pytest.raises(errors.CheckpointError, match=r"state/_METADATA is not valid JSON"):
    checkpoints.restore_params(model_dir, abstract)


def _largest_data_file(step_dir):
  files = _files(os.path.join(step_dir, "state"))
  return os.path.join(step_dir, "state", max(files, key=files.get))


def test_damaged_checkpoint_stops_resume_and_evaluate(trained, tmp_path, env):
  model_dir = _copy_run(trained[0], tmp_path)
  step_dir = os.path.join(checkpoints.checkpoint_dir(model_dir), "4")
  damaged = _largest_data_file(step_dir)
  _truncate(damaged)
  before = _files(model_dir)
  for command in (_train_command(model_dir, "--gin.TRAIN_STEPS=6"),
                  _evaluate_command(model_dir)):
    result, _ = _run(command, env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"Checkpoint {step_dir} is damaged: {damaged} has" in result.stderr
    assert "The newest intact earlier checkpoint is step 2" in result.stderr
    assert "Traceback" not in result.stderr
  assert _files(model_dir) == before


def test_fallback_resumes_from_the_intact_step_bit_identically(trained, tmp_path, env):
  model_dir = _copy_run(trained[0], tmp_path)
  step_dir = os.path.join(checkpoints.checkpoint_dir(model_dir), "4")
  _truncate(_largest_data_file(step_dir))
  result, _ = _run(_train_command(model_dir, "--gin.trainer.LoopConfig.resume_fallback=True"),
                   env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from the newest intact step 2" in result.stdout
  assert "Resuming from checkpoint step 2" in result.stdout
  assert checkpoints.checkpoint_steps(model_dir) == [2, 4]
  assert checkpoints.find_damage(step_dir) is None
  jax.tree.map(np.testing.assert_array_equal, _final_params(model_dir), trained[1])
