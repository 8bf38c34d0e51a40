"""A run keeps only its open calls for the run-end sweep, not every call it ever watched."""

from __future__ import annotations

import litellm

from tokenledger import Ledger

MESSAGES = [{"role": "user", "content": "hi"}]


def test_finished_streams_are_not_kept_until_the_run_ends(ledger: Ledger) -> None:
    with ledger.run("streams") as run:
        for _ in range(300):
            for _chunk in litellm.completion(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, mock_response="ok"
            ):
                pass
        watched = len(ledger.recorder.open_streams(run.id))
    # 300 streams, all finished: the list is pruned whenever it doubles past 64.
    assert watched <= 128
    assert 300 == run.calls
    assert [] == ledger.recorder.open_streams(run.id)
