"""Everything that knows about process groups: the TP x PP x DP grid, label sampling, Hutchinson probes."""
