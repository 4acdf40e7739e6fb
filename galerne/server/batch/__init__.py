"""Batch jobs, in both APIs' shapes (OpenAI's ``/v1/batches``, Mistral's
``/v1/batch/jobs``): routes.py answers them, protocol.py writes their objects and lines,
runner.py runs them with the server's own engine at low priority. Their records and
journals are the platform's (``galerne.platform.batches``)."""
