"""``python -m tokenledger.cli``: the ``tokenledger`` command, where the console script
is not installed (and for timing its start-up without the script's wrapper)."""

from __future__ import annotations

from tokenledger.cli import main

main()
