"""Federated-learning maths: local training, sampling, aggregation, server optimizer, evaluation.

No MPI here: the orchestrator calls these on whichever rank owns the work.
"""
