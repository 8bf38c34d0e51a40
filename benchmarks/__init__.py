"""tokenledger's performance harness: every figure is a ratio against a baseline measured
in the same run, interleaved so the drift of a shared machine cancels out."""
