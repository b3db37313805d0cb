"""Dense baseline vs CNN, measured: ``python -m training compare``.

- :mod:`.baseline`: the dense network (flatten -> hidden layers -> classes), sized to at least
  the CNN's parameter count;
- :mod:`.shift`: the test split moved by whole pixels, and accuracy under those shifts;
- :mod:`.probes`: receptive fields, equivariance of the first layer, the patches that excite a
  channel most, the mistakes;
- :mod:`.run`: trains both on one split, seed and budget, exports both, measures both;
- :mod:`.figures` and :mod:`.report`: ``compare/index.md``, its PNG figures and
  ``compare/index.html`` (the same as one self-contained page).
"""
