"""Ways of running a backend process, behind one small interface (see base.py)."""
