"""DeepSeek's own tests and examples, run against dsinfra: the proof that
dsinfra is a drop-in for FlashMLA, DeepGEMM, DeepEP, DualPipe and EPLB.

- :mod:`~dsinfra.conformance.suite`: which upstream files, at which commits;
- :mod:`~dsinfra.conformance.rules`: the adaptations, as named rules with their reasons;
- :mod:`~dsinfra.conformance.standins`: CPU stand-ins for CUDA-only helpers;
- :mod:`~dsinfra.conformance.sources`: the repositories, cloned into a cache;
- :mod:`~dsinfra.conformance.runner`: runs them and prints the table
  (``python -m dsinfra.conformance``, or ``scripts/upstream-conformance``).

No upstream file is part of dsinfra: the runner fetches them at run time.
See docs/compatibility.md.
"""
