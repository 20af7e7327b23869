"""What every room may use: the DDIM schedule, `Networks` and the role table, run and checkpoint
reading, atomic file writes and stage timing. Imports only `edgeinspect.config`."""
