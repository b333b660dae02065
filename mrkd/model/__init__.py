"""The method, math only (no file or network I/O): teacher registry, MRKD network, ILM/FLM, loss.
Imports mrkd.core only."""
