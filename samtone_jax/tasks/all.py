"""Importing this module registers every task, mixture and evaluation set of samtone_jax.

  import samtone_jax.tasks.all  # noqa: F401

Registration never reads data: files are opened when a task or eval set is first used, from the
locations in `samtone_jax.tasks.paths`.
"""

from samtone_jax.tasks import demo

demo.register()
