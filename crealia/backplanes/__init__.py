"""The backplanes a server runs on: ``sqlite`` (one process) and ``redis`` (a cluster).

Each is registered in the ``crealia.backplanes`` entry-point group, like a third party's.
"""
