"""``mscn ablate``: the paper's ablations (§5.1-5.2, §6.3 Fig. 5) re-run at small scale, with seeds."""
