"""MPI transport: roles, model broadcast, byte gathers, polling waits. Never imports codecs."""
