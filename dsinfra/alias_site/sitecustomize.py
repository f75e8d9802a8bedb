"""Imported first by every Python process started under ``python -m dsinfra run``
(this directory leads their ``PYTHONPATH``): installs the import aliases, then
runs the ``sitecustomize`` module this one hides, if there is one."""

import dsinfra.alias
from dsinfra.run_aliased import run_hidden_sitecustomize

run_hidden_sitecustomize(__file__)
