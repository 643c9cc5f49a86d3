"""The applications built on the library core: each calls :class:`spade_faiss.Spade` and none
reads the corpus file or runs a scoring stage itself.

- ``cli``: the ``spade-faiss`` command line
- ``serve``: the HTTP scoring service
- ``distributed``: indexing and scoring on Ray
- ``evaluation``: paper-style evaluation of MVTec-layout datasets
- ``runs``: the files of a scoring run (scores, maps, overlays, manifest)
- ``pictures``: every picture (colour maps, overlays, curves, sheets)
- ``verify``: integrity checks of a corpus file
"""
