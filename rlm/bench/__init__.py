"""``rlm bench``: answer quality and cost of an RLM against a direct call, on generated tasks.

``generators`` makes the tasks (offline, from a seed), ``scorers`` grades answers,
``methods`` answers one task one way (this project's RLM, one direct call, the
official ``rlms`` package), ``runner`` runs every (task, length, method, seed) cell
resumably under a cost cap, and ``report`` writes summary.json, report.html and the
table. Nothing here is imported by ``import rlm``.
"""
