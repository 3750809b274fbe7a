"""The backplanes a server runs on: ``sqlite`` (one process) and ``redis`` (a cluster).

Each is registered in the ``crealia.backplanes`` entry-point group, like a third party's, as an
``open_backplane(url, config)`` factory (:class:`crealia.abc.BackplaneFactory`); the server picks
one by the scheme of ``Config.backplane_url``. Nothing in the core imports these modules.
"""
