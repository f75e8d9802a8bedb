"""DeepEP's helper package under its own names (``deep_ep.utils``): ``envs``
(the process group and seeds of a test), ``math`` (its numerics and FP8 casts)
and ``testing`` (its timers, by the wall clock). DeepEP's tests import them from
here since they moved out of the tests' own ``utils.py``."""
