# A package on purpose: see conftest.py.
