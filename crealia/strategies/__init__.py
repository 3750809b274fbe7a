"""The built-in conflict strategies: ``merge``, ``priority``, ``ai`` and ``manual``.

They register through the ``crealia.strategies`` entry-point group like any plugin.
"""
