import sys

from maml_jax.cli import main

sys.exit(main())
