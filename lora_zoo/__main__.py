"""``python -m lora_zoo``: the CLI without the console script (subprocesses, Ray workers)."""

import sys

from lora_zoo.cli import main

sys.exit(main())
