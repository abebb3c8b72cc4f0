"""`python -m leanformer.cli …`: the `leanformer` command, for launchers that start a module
(`accelerate launch -m leanformer.cli …`, `torchrun -m leanformer.cli …`)."""
import sys

from . import main

sys.exit(main())
