import sys

from maml_jax.host import reexec_with_malloc_hugepages

reexec_with_malloc_hugepages()  # glibc's huge-page malloc for XLA's buffers (maml_jax.host)

from maml_jax.cli import main  # noqa: E402

sys.exit(main())
