"""autoresearch: autonomous LLM-training research on the hardware you have.

The CLI never writes bytecode beside the project's code: a `.pyc` under `harness/`, `loop/` or
`autoresearch/` is then always foreign, and the runner removes it (and refuses the run that
planted it) instead of trusting it.
"""

import sys

sys.dont_write_bytecode = True
