"""Importing this module registers every task, mixture and evaluation set of samtone_jax.

  import samtone_jax.tasks.all  # noqa: F401

Registration never reads data files: they are opened when a task or eval set is first used, from
the locations in `samtone_jax.tasks.paths` (read at that moment, so `paths.configure_data_dirs`
may be called after this import). BEIR datasets are registered by `beir.register_beir_dataset
(name, path)`; the ones unpacked under $SAMTONE_DATA_DIR/beir/<name>/ are registered here, and so
are the TSV knowledge graphs $SAMTONE_DATA_DIR/kg/<name>.tsv (SKILL tasks "skill_<name>").
"""

import os

from samtone_jax.tasks import beir
from samtone_jax.tasks import demo
from samtone_jax.tasks import msmarco
from samtone_jax.tasks import multireqa
from samtone_jax.tasks import paths
from samtone_jax.tasks import skill

demo.register()
msmarco.register()
multireqa.register()
beir.register_beir_directories(os.path.join(paths.data_dir(), "beir"))
skill.register()  # SKILL knowledge infusion, closed-book QA, the WordNet demo
