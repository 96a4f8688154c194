import sys

from maml_jax.cli import console_main  # restarts with glibc's huge-page malloc where that helps

sys.exit(console_main())
