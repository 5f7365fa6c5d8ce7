"""``mscn ablate``: the paper's ablations (§5, §6.3, Fig. 5, Table 5) re-run at small scale, with seeds."""
