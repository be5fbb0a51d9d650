"""The recorder: writes every quote from FT's stream into the history database.

``config`` (:class:`~quotopia.recorder.config.RecorderConfig`, light enough for
``quotopia --help``), ``service`` (:func:`~quotopia.recorder.service.serve`, the
task tree), ``gaps`` (gap detection, pure) and ``metrics``.
"""
